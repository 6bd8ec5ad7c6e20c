//! `termopar backup` and `termopar restore`: PostgreSQL and the document store together,
//! at one point where the rollups, the index of raw documents and the raw documents agree.
//!
//! A backup is a directory: `manifest.json` (written last: a backup without it is
//! incomplete), each table as PostgreSQL's binary `COPY` in `pg/`, each collection as
//! concatenated BSON documents (mongodump's `.bson` format) in `docs/`.
//!
//! **Consistency.** Every table is copied in one `REPEATABLE READ` snapshot. The document
//! store has no snapshot, so it is read after that one, and two things keep what it holds
//! a superset of what the snapshot references:
//! - Documents are written before PostgreSQL references them, so any document the
//!   snapshot names was written before the dump starts.
//! - Nothing deletes documents while a backup runs: every deletion (expired segments,
//!   fragment collections, a deleted site's raw pages) happens in a transaction holding
//!   the [`FENCE`] advisory lock shared, and the backup holds it exclusively from before
//!   its snapshot to the end of the dump. A deletion that committed before the snapshot
//!   deleted documents the snapshot does not reference.
//!
//! Documents written after the snapshot come along unreferenced: outbox rows of the
//! snapshot are relayed again after a restore, and the document store refuses the copies
//! as duplicates, as after any lost commit; raw segments are found only through the index.
//!
//! **Restore** takes an empty target (migrated here, as the backup's version migrated
//! it): the documents first, then every table in one transaction, parents before
//! children, and the sequences; if anything fails, the collections it created are dropped
//! and the transaction rolls back, so the target is empty again.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context};
use futures::TryStreamExt;
use mongodb::{
    bson::{doc, RawDocumentBuf},
    Database,
};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

/// The advisory lock that keeps deletions out of a backup's way (see the module's
/// documentation): deletions take it shared for their transaction, a backup exclusively.
pub const FENCE: i64 = 0x7465_726d_6f70_6172; // "termopar"

/// Takes the [`FENCE`] shared for the rest of `tx`, for a deletion of documents; false
/// (and nothing may be deleted) while a backup runs.
pub async fn fenced(tx: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock_shared($1)")
        .bind(FENCE)
        .fetch_one(tx)
        .await
}

/// The format this version writes and reads.
const FORMAT: u32 = 1;
/// Schemas that hold termopar's tables (`apalis`: the job queue).
const SCHEMAS: [&str; 2] = ["public", "apalis"];
/// Tables that say which migrations ran: checked, not copied.
const MIGRATION_TABLES: [&str; 2] = ["_sqlx_migrations", "_apalis_migrations"];
/// Tables whose one row the migrations create and other tables' triggers keep (the
/// alarm rules' change counter): not copied, restoring those tables moves them.
const DERIVED_TABLES: [&str; 1] = ["alarm_rules_version"];
/// Documents per insert at restore, at most.
const INSERT_DOCS: usize = 1000;
/// Bytes per insert at restore, at most (below the 16 MiB of a command).
const INSERT_BYTES: usize = 8 << 20;

/// What a backup holds; `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Versions of the migrations applied, termopar's then the job queue's.
    pub migrations: Vec<i64>,
    pub job_migrations: Vec<i64>,
    pub tables: Vec<Table>,
    pub sequences: Vec<Sequence>,
    pub collections: Vec<Collection>,
}

/// One table and its rows in the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// Copied columns (generated ones are left to PostgreSQL), in order.
    pub columns: Vec<String>,
    pub rows: u64,
    /// Under the backup's directory.
    pub file: String,
}

/// A sequence's position (`None`: never used).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sequence {
    pub schema: String,
    pub name: String,
    pub last_value: Option<i64>,
}

/// One collection and its documents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Collection {
    pub name: String,
    pub documents: u64,
    pub file: String,
}

impl Table {
    fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Writes a backup of `pg` and `docs` into `dir` (created; it must not exist or be
/// empty).
pub async fn backup(pg: &PgPool, docs: &Database, dir: &Path) -> anyhow::Result<Manifest> {
    prepare_dir(dir).await?;
    // The fence, on a connection of its own: it is released when the backup ends, or
    // when this connection closes (the process died).
    let mut fence = PgConnection::connect_with(&pg.connect_options())
        .await
        .context("failed to connect to PostgreSQL")?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(FENCE)
        .execute(&mut fence)
        .await
        .context("failed to stop deletions for the backup")?;

    let mut snapshot = pg.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snapshot)
        .await?;
    let migrations = applied(&mut snapshot, "_sqlx_migrations").await?;
    let job_migrations = applied(&mut snapshot, "_apalis_migrations").await?;
    let mut tables = Vec::new();
    for (i, (schema, name)) in tables_of(&mut snapshot).await?.into_iter().enumerate() {
        let columns = columns_of(&mut snapshot, &schema, &name).await?;
        let mut table = Table {
            schema,
            name,
            columns,
            rows: 0,
            file: format!("pg/{i:03}.copy"),
        };
        table.rows = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            table.qualified()
        )))
        .fetch_one(&mut *snapshot)
        .await? as u64;
        let mut out = BufWriter::new(tokio::fs::File::create(dir.join(&table.file)).await?);
        let statement = format!(
            "COPY {} ({}) TO STDOUT WITH (FORMAT binary)",
            table.qualified(),
            table.column_list()
        );
        let mut chunks = snapshot.copy_out_raw(&statement).await?;
        while let Some(chunk) = chunks.try_next().await? {
            out.write_all(&chunk).await?;
        }
        drop(chunks);
        out.flush().await?;
        out.into_inner().sync_all().await?;
        tables.push(table);
    }
    let sequences = sqlx::query_as::<_, (String, String, Option<i64>)>(
        "SELECT schemaname::text, sequencename::text, last_value FROM pg_sequences
         WHERE schemaname = ANY($1) ORDER BY 1, 2",
    )
    .bind(&SCHEMAS[..])
    .fetch_all(&mut *snapshot)
    .await?
    .into_iter()
    .map(|(schema, name, last_value)| Sequence {
        schema,
        name,
        last_value,
    })
    .collect();

    let mut collections = Vec::new();
    let mut names = docs.list_collection_names().await?;
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let file = format!("docs/{i:03}.bson");
        let mut out = BufWriter::new(tokio::fs::File::create(dir.join(&file)).await?);
        let mut cursor = docs
            .collection::<RawDocumentBuf>(&name)
            .find(doc! {})
            .await?;
        let mut documents = 0u64;
        while let Some(document) = cursor.try_next().await? {
            out.write_all(document.as_bytes()).await?;
            documents += 1;
        }
        out.flush().await?;
        out.into_inner().sync_all().await?;
        collections.push(Collection {
            name,
            documents,
            file,
        });
    }
    snapshot.commit().await?;

    let manifest = Manifest {
        format: FORMAT,
        created_at: chrono::Utc::now(),
        migrations,
        job_migrations,
        tables,
        sequences,
        collections,
    };
    let written = dir.join("manifest.json.tmp");
    tokio::fs::write(&written, serde_json::to_vec_pretty(&manifest)?).await?;
    tokio::fs::rename(&written, dir.join("manifest.json")).await?;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(FENCE)
        .execute(&mut fence)
        .await?;
    fence.close().await?;
    Ok(manifest)
}

/// Restores the backup in `dir` into `pg` (migrated by the caller to the same versions)
/// and `docs`, which must hold none of its rows or documents.
pub async fn restore(pg: &PgPool, docs: &Database, dir: &Path) -> anyhow::Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(
        &tokio::fs::read(dir.join("manifest.json"))
            .await
            .with_context(|| format!("{} holds no complete backup", dir.display()))?,
    )
    .context("manifest.json is not a backup's manifest")?;
    ensure!(
        manifest.format == FORMAT,
        "backup format {} (this version reads {FORMAT})",
        manifest.format
    );

    let mut tx = pg.begin().await?;
    let (migrations, job_migrations) = (
        applied(&mut tx, "_sqlx_migrations").await?,
        applied(&mut tx, "_apalis_migrations").await?,
    );
    ensure!(
        migrations == manifest.migrations && job_migrations == manifest.job_migrations,
        "the backup was made by another version of termopar (its migrations {:?} + {:?}, \
         this database's {:?} + {:?}): restore it with that version",
        manifest.migrations,
        manifest.job_migrations,
        migrations,
        job_migrations
    );
    let present: BTreeSet<(String, String)> = tables_of(&mut tx).await?.into_iter().collect();
    for table in &manifest.tables {
        ensure!(
            present.contains(&(table.schema.clone(), table.name.clone())),
            "table {} of the backup is missing here",
            table.qualified()
        );
        let any: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {})",
            table.qualified()
        )))
        .fetch_one(&mut *tx)
        .await?;
        ensure!(
            !any,
            "table {} is not empty: restore into an empty database",
            table.qualified()
        );
    }
    let existing: BTreeSet<String> = docs.list_collection_names().await?.into_iter().collect();
    for collection in &manifest.collections {
        if existing.contains(&collection.name) {
            let any = docs
                .collection::<RawDocumentBuf>(&collection.name)
                .find_one(doc! {})
                .await?
                .is_some();
            ensure!(
                !any,
                "collection {} is not empty: restore into an empty document store",
                collection.name
            );
        }
    }

    let restored = async {
        for collection in &manifest.collections {
            insert_documents(docs, collection, &dir.join(&collection.file)).await?;
        }
        for table in in_dependency_order(&mut tx, &manifest.tables).await? {
            let mut copy = tx
                .copy_in_raw(&format!(
                    "COPY {} ({}) FROM STDIN WITH (FORMAT binary)",
                    table.qualified(),
                    table.column_list()
                ))
                .await?;
            let file = tokio::fs::File::open(dir.join(&table.file)).await?;
            if let Err(e) = copy.read_from(file).await {
                copy.abort("the backup file could not be read").await.ok();
                return Err(e.into());
            }
            let rows = copy.finish().await?;
            ensure!(
                rows == table.rows,
                "table {}: {rows} rows restored, the backup holds {}",
                table.qualified(),
                table.rows
            );
        }
        for sequence in &manifest.sequences {
            let name = format!("{}.{}", ident(&sequence.schema), ident(&sequence.name));
            match sequence.last_value {
                Some(value) => sqlx::query("SELECT setval($1::regclass, $2, true)")
                    .bind(&name)
                    .bind(value),
                None => sqlx::query("SELECT setval($1::regclass, 1, false)").bind(&name),
            }
            .execute(&mut *tx)
            .await?;
        }
        anyhow::Ok(())
    }
    .await;
    let committed = match restored {
        Ok(()) => tx.commit().await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        for collection in &manifest.collections {
            if !existing.contains(&collection.name) {
                let _ = docs
                    .collection::<RawDocumentBuf>(&collection.name)
                    .drop()
                    .await;
            }
        }
        return Err(e.context("restore failed; nothing was kept"));
    }
    Ok(manifest)
}

/// Creates `dir` (and `pg/`, `docs/`), refusing one that holds anything.
async fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        if entries.next_entry().await?.is_some() {
            bail!("{} is not empty", dir.display());
        }
    }
    for sub in ["pg", "docs"] {
        tokio::fs::create_dir_all(dir.join(sub))
            .await
            .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    Ok(())
}

/// The migrations `table` records as applied (none when it does not exist).
async fn applied(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<i64>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {} WHERE success ORDER BY version",
        ident(table)
    )))
    .fetch_all(&mut *conn)
    .await?)
}

/// termopar's tables (the migration records and derived tables left out), by schema and
/// name.
async fn tables_of(conn: &mut PgConnection) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND NOT c.relispartition AND n.nspname = ANY($1)
           AND c.relname <> ALL($2)
         ORDER BY 1, 2",
    )
    .bind(&SCHEMAS[..])
    .bind([&MIGRATION_TABLES[..], &DERIVED_TABLES[..]].concat())
    .fetch_all(&mut *conn)
    .await?)
}

/// The columns of a table that take values (not generated ones), in order.
async fn columns_of(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_attribute a
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attgenerated = ''
         ORDER BY a.attnum",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(&mut *conn)
    .await?)
}

/// `tables` with every table after the tables its foreign keys name.
async fn in_dependency_order<'t>(
    conn: &mut PgConnection,
    tables: &'t [Table],
) -> anyhow::Result<Vec<&'t Table>> {
    let edges: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT cn.nspname::text, c.relname::text, pn.nspname::text, p.relname::text
         FROM pg_constraint k
         JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
         JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
         WHERE k.contype = 'f'",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut parents: BTreeMap<(&str, &str), BTreeSet<(String, String)>> = BTreeMap::new();
    for (cs, c, ps, p) in &edges {
        if (cs, c) != (ps, p) {
            parents
                .entry((cs.as_str(), c.as_str()))
                .or_default()
                .insert((ps.clone(), p.clone()));
        }
    }
    let mut done: BTreeSet<(String, String)> = BTreeSet::new();
    let mut ordered = Vec::with_capacity(tables.len());
    let all: BTreeSet<(String, String)> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    while ordered.len() < tables.len() {
        let before = ordered.len();
        for table in tables {
            let key = (table.schema.clone(), table.name.clone());
            if done.contains(&key) {
                continue;
            }
            let ready = parents
                .get(&(table.schema.as_str(), table.name.as_str()))
                .is_none_or(|ps| ps.iter().all(|p| done.contains(p) || !all.contains(p)));
            if ready {
                done.insert(key);
                ordered.push(table);
            }
        }
        ensure!(
            ordered.len() > before,
            "the tables' foreign keys form a cycle"
        );
    }
    Ok(ordered)
}

/// Inserts a collection's documents from its `.bson` file, in commands of at most
/// [`INSERT_DOCS`] documents and [`INSERT_BYTES`] bytes.
async fn insert_documents(
    docs: &Database,
    collection: &Collection,
    file: &PathBuf,
) -> anyhow::Result<()> {
    let target = docs.collection::<RawDocumentBuf>(&collection.name);
    // A collection with no documents is still created, as it was.
    if collection.documents == 0 {
        docs.create_collection(&collection.name).await.ok();
        return Ok(());
    }
    let mut input = BufReader::new(tokio::fs::File::open(file).await?);
    let (mut batch, mut bytes, mut inserted) = (Vec::new(), 0usize, 0u64);
    loop {
        let mut length = [0u8; 4];
        match input.read_exact(&mut length).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let size = u32::from_le_bytes(length) as usize;
        ensure!(
            size >= 5,
            "{}: a document's length is {size}",
            file.display()
        );
        let mut document = vec![0u8; size];
        document[..4].copy_from_slice(&length);
        input.read_exact(&mut document[4..]).await?;
        let document = RawDocumentBuf::from_bytes(document)
            .with_context(|| format!("{}: not BSON", file.display()))?;
        if !batch.is_empty() && (batch.len() == INSERT_DOCS || bytes + size > INSERT_BYTES) {
            let full = std::mem::take(&mut batch);
            inserted += full.len() as u64;
            target.insert_many(full).await?;
            bytes = 0;
        }
        bytes += size;
        batch.push(document);
    }
    if !batch.is_empty() {
        inserted += batch.len() as u64;
        target.insert_many(batch).await?;
    }
    ensure!(
        inserted == collection.documents,
        "collection {}: {inserted} documents in the file, the manifest says {}",
        collection.name,
        collection.documents
    );
    Ok(())
}
