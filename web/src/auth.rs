//! Who is calling: the [`Principal`] every protected operation receives, the bearer
//! scheme that yields it, and the [`Authenticator`] that checks access tokens against
//! the users as stored now (through its own short cache).

use moka::future::Cache;
use poem::Request;
use poem_openapi::{auth::Bearer, Enum, SecurityScheme};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    error::{ApiError, ApiResult},
    settings::AuthSettings,
    tokens::{Jwt, TokenType},
};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Role {
    /// Everything, across every client.
    Admin,
    /// One client: manage its sensors, read its data.
    Operator,
    /// One client: read only.
    Viewer,
}

impl Role {
    /// The value stored in `users.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// Parses the value stored in `users.role`.
    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's id.
    pub user_id: Uuid,
    /// The user's role, as stored now (not as it was when the token was issued).
    pub role: Role,
    /// The user's client; `None` for admins.
    pub client_id: Option<Uuid>,
}

impl Principal {
    /// True for admins.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// 403 unless the caller is an admin.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("only admins may do this"))
        }
    }

    /// Whether the caller may read data of `client_id`. When this is false the caller
    /// must get a 404, never a 403, so that other tenants' ids do not leak.
    pub fn sees_client(&self, client_id: Uuid) -> bool {
        self.is_admin() || self.client_id == Some(client_id)
    }

    /// For a resource of `client_id` the caller can see: 403 unless it may also change
    /// it (admins, and operators of that client).
    pub fn require_manager_of(&self, client_id: Uuid) -> ApiResult<()> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Operator if self.client_id == Some(client_id) => Ok(()),
            _ => Err(ApiError::forbidden("your role may not change this")),
        }
    }

    /// The client a query must be limited to: `None` (everything) for admins.
    pub fn tenant_scope(&self) -> Option<Uuid> {
        if self.is_admin() {
            None
        } else {
            self.client_id
        }
    }

    /// The client a list is limited to, given the client it asked for: `Ok(None)` for
    /// every client (admins asking for none), `Err(())` when the caller asked for a
    /// client it cannot see (the list is then empty, exactly as for an unknown id).
    #[allow(clippy::result_unit_err)]
    pub fn list_scope(&self, asked: Option<Uuid>) -> Result<Option<Uuid>, ()> {
        match (self.tenant_scope(), asked) {
            (Some(own), Some(asked)) if own != asked => Err(()),
            (Some(own), _) => Ok(Some(own)),
            (None, asked) => Ok(asked),
        }
    }

    /// The client a new resource (`what`, plural) belongs to, given the `client_id` the
    /// request named: required from admins, the operator's own when omitted, 403 for
    /// viewers, and 422 for a client the caller cannot see (as for an unknown one).
    pub fn client_for_new(&self, asked: Option<Uuid>, what: &str) -> ApiResult<Uuid> {
        match (self.role, asked) {
            (Role::Viewer, _) => Err(ApiError::forbidden(format!("viewers cannot create {what}"))),
            (Role::Admin, None) => Err(ApiError::validation("client_id", "client_id is required")),
            (Role::Admin, Some(id)) => Ok(id),
            (Role::Operator, None) => Ok(self.client_id.expect("operators have a client")),
            // Another tenant's id is answered as if it did not exist.
            (Role::Operator, Some(id)) if !self.sees_client(id) => {
                Err(ApiError::validation("client_id", "no such client"))
            }
            (Role::Operator, Some(id)) => Ok(id),
        }
    }
}

/// Bearer JWT access token from `POST /auth/login`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Principal);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let auth = req
        .data::<Authenticator>()
        .expect("the Authenticator is attached to every route");
    Ok(auth.authenticate(&bearer.token).await?)
}

/// What a token check needs to know of a user, cached.
#[derive(Debug, Clone)]
struct AuthUser {
    role: Role,
    client_id: Option<Uuid>,
    token_version: i32,
}

/// Checks access tokens and owns the cache of users as token checks see them. Cheap to
/// clone; attached to every request.
#[derive(Clone)]
pub struct Authenticator {
    pg: PgPool,
    jwt: Jwt,
    /// Users by id. `None` caches "no such user".
    users: Cache<Uuid, Option<AuthUser>>,
}

impl Authenticator {
    /// Keys and cache lifetime from `settings`; users read from `pg`.
    pub fn new(settings: &AuthSettings, pg: PgPool) -> Self {
        Self {
            pg,
            jwt: Jwt::new(settings),
            users: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.user_cache_ttl)
                .build(),
        }
    }

    /// The token keys (to issue tokens).
    pub fn jwt(&self) -> &Jwt {
        &self.jwt
    }

    /// Checks an access token and returns who it speaks for. The role and tenant come
    /// from the user as stored now (through a short cache), so a demoted or deleted user
    /// loses access without waiting for the token to expire.
    pub async fn authenticate(&self, token: &str) -> ApiResult<Principal> {
        let claims = self.jwt.verify(token, TokenType::Access)?;
        let user = self
            .users
            .try_get_with(claims.sub, self.load(claims.sub))
            .await
            .map_err(|e| (*e).clone())?
            .ok_or_else(|| ApiError::unauthorized("user no longer exists"))?;
        if user.token_version != claims.ver {
            return Err(ApiError::unauthorized("token revoked"));
        }
        Ok(Principal {
            user_id: claims.sub,
            role: user.role,
            client_id: user.client_id,
        })
    }

    async fn load(&self, id: Uuid) -> ApiResult<Option<AuthUser>> {
        let row: Option<(String, Option<Uuid>, i32)> =
            sqlx::query_as("SELECT role, client_id, token_version FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pg)
                .await?;
        Ok(row.map(|(role, client_id, token_version)| AuthUser {
            role: Role::from_db(&role).expect("role is constrained in the schema"),
            client_id,
            token_version,
        }))
    }

    /// Forgets the cached view of a user after it changed.
    pub async fn forget(&self, id: Uuid) {
        self.users.invalidate(&id).await;
    }
}
