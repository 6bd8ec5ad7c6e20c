//! The admin created at start when no admin exists.

use secrecy::ExposeSecret;
use sqlx::PgPool;
use termopar_web::Role;

use crate::{credentials::password, settings::BootstrapAdmin, users};

/// Arbitrary key of the advisory lock that keeps two replicas starting together from
/// both creating an admin.
const BOOTSTRAP_LOCK: i64 = 0x7465_726d_6f70_6172; // "termopar"

/// Creates the configured admin unless some admin already exists.
pub(crate) async fn ensure_admin(pg: &PgPool, admin: &BootstrapAdmin) -> anyhow::Result<()> {
    let hash = password::hash(admin.password.expose_secret().to_owned()).await;
    let mut tx = pg.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(BOOTSTRAP_LOCK)
        .execute(&mut *tx)
        .await?;
    let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE role = 'admin'")
        .fetch_one(&mut *tx)
        .await?;
    if admins > 0 {
        return Ok(());
    }
    let taken: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($1))")
            .bind(&admin.email)
            .fetch_one(&mut *tx)
            .await?;
    if taken {
        anyhow::bail!(
            "ADMIN_EMAIL {} belongs to a user who is not an admin, and no admin exists",
            admin.email
        );
    }
    users::insert(&mut tx, admin.email.trim(), &hash, Role::Admin, None)
        .await
        .map_err(|e| anyhow::anyhow!("failed to create the admin: {}", e.message()))?;
    tx.commit().await?;
    tracing::info!(email = %admin.email, "bootstrap admin created");
    Ok(())
}
