//! Storage of the notes app: MySQL-compatible, over mysql_async, through one configured
//! endpoint (`--db-url mysql://user:pw@host:port/db`): MariaDB itself or the db-router in
//! front of a primary and replicas; only the URL differs.
//!
//! The schema is created or migrated at start: `schema_version` records the migrations
//! applied; [`MIGRATIONS`] lists them in order. Nodes starting together serialize on a
//! named lock (`GET_LOCK`), so each migration runs once. A database already at a newer
//! version (a newer release migrated it, this one is a rollback) is left as it is.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use serde::Serialize;

/// Every storage operation is bounded by this.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// A health ping is bounded by this.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Schema migrations, in order: (version, statement).
pub const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS notes (
            id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            author VARCHAR(64) NOT NULL,
            body TEXT NOT NULL,
            node VARCHAR(64) NOT NULL,
            release_version VARCHAR(64) NOT NULL,
            created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    ),
    // The page lists the newest notes first.
    (2, "CREATE INDEX IF NOT EXISTS notes_created ON notes (created_at)"),
];

const NOTE_COLUMNS: &str =
    "id, author, body, node, release_version, DATE_FORMAT(created_at, '%Y-%m-%dT%H:%i:%s.%fZ')";

/// Why a storage operation failed. All of these are upstream errors (503 to the client).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid --db-url: {0}")]
    InvalidUrl(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Mysql(#[from] mysql_async::Error),
    #[error("{0}")]
    Schema(String),
}

/// A stored note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    pub id: u64,
    pub author: String,
    pub text: String,
    /// The node that stored it.
    pub node: String,
    /// The release that node was serving.
    pub release: String,
    /// UTC, RFC 3339 with microseconds.
    pub created_at: String,
}

type NoteRow = (u64, String, String, String, String, String);

fn note((id, author, text, node, release, created_at): NoteRow) -> Note {
    Note { id, author, text, node, release, created_at }
}

/// A pool of connections to the configured endpoint.
#[derive(Debug, Clone)]
pub struct Storage {
    pool: Pool,
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    tokio::time::timeout(limit, fut).await.unwrap_or(Err(StorageError::Timeout(limit)))
}

impl Storage {
    /// Checks the URL and creates the pool (no connection is made yet).
    pub fn new(url: &str) -> Result<Storage, StorageError> {
        let opts = Opts::from_url(url).map_err(|e| StorageError::InvalidUrl(e.to_string()))?;
        if opts.db_name().is_none() {
            return Err(StorageError::InvalidUrl("no database name (mysql://user:pw@host:port/DB)".into()));
        }
        let constraints = PoolConstraints::new(0, 32).expect("0 <= 32");
        let opts = OptsBuilder::from_opts(opts)
            // Timestamps are formatted as UTC.
            .setup(vec!["SET time_zone = '+00:00'"])
            // Otherwise mysql_async asks the server for `@@socket` and reconnects over that
            // Unix socket when it can reach it: past the configured endpoint (a router on the
            // same host would be bypassed, writes would land on a read-only replica).
            .prefer_socket(false)
            .pool_opts(PoolOpts::default().with_constraints(constraints))
            .conn_ttl(Duration::from_secs(60));
        Ok(Storage { pool: Pool::new(opts) })
    }

    async fn conn(&self) -> Result<Conn, StorageError> {
        Ok(self.pool.get_conn().await?)
    }

    /// Creates or migrates the schema; returns the schema version now in place.
    pub async fn migrate(&self) -> Result<u32, StorageError> {
        bounded(Duration::from_secs(60), async {
            let mut conn = self.conn().await?;
            conn.query_drop(
                "CREATE TABLE IF NOT EXISTS schema_version (
                    version INT UNSIGNED NOT NULL PRIMARY KEY,
                    applied_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                ) ENGINE=InnoDB",
            )
            .await?;
            let locked: Option<Option<i64>> = conn.query_first("SELECT GET_LOCK('web_app_schema', 30)").await?;
            if locked != Some(Some(1)) {
                return Err(StorageError::Schema("could not take the schema lock web_app_schema in 30 s".into()));
            }
            let result = apply_migrations(&mut conn).await;
            let _: Option<Option<i64>> = conn.query_first("SELECT RELEASE_LOCK('web_app_schema')").await?;
            result
        })
        .await
    }

    /// One round trip to the endpoint, bounded by [`PING_TIMEOUT`].
    pub async fn ping(&self) -> Result<(), StorageError> {
        bounded(PING_TIMEOUT, async {
            let mut conn = self.conn().await?;
            conn.ping().await?;
            Ok(())
        })
        .await
    }

    /// The newest `limit` notes, newest first.
    pub async fn list(&self, limit: u32) -> Result<Vec<Note>, StorageError> {
        bounded(OP_TIMEOUT, async {
            let mut conn = self.conn().await?;
            let rows: Vec<NoteRow> = conn
                .exec(format!("SELECT {NOTE_COLUMNS} FROM notes ORDER BY created_at DESC, id DESC LIMIT ?"), (limit,))
                .await?;
            Ok(rows.into_iter().map(note).collect())
        })
        .await
    }

    /// One note by id.
    pub async fn get(&self, id: u64) -> Result<Option<Note>, StorageError> {
        bounded(OP_TIMEOUT, async {
            let mut conn = self.conn().await?;
            let row: Option<NoteRow> =
                conn.exec_first(format!("SELECT {NOTE_COLUMNS} FROM notes WHERE id = ?"), (id,)).await?;
            Ok(row.map(note))
        })
        .await
    }

    /// Stores a note and returns it as stored (MariaDB's `INSERT ... RETURNING`: one round
    /// trip, and no read that a router could send to a lagging replica).
    pub async fn insert(&self, author: &str, text: &str, node: &str, release: &str) -> Result<Note, StorageError> {
        bounded(OP_TIMEOUT, async {
            let mut conn = self.conn().await?;
            let row: Option<NoteRow> = conn
                .exec_first(
                    format!(
                        "INSERT INTO notes (author, body, node, release_version) VALUES (?, ?, ?, ?) RETURNING {NOTE_COLUMNS}"
                    ),
                    (author, text, node, release),
                )
                .await?;
            row.map(note).ok_or_else(|| StorageError::Schema("INSERT ... RETURNING returned no row".into()))
        })
        .await
    }

    /// Closes the pool's connections.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.pool.disconnect()).await;
    }
}

async fn apply_migrations(conn: &mut Conn) -> Result<u32, StorageError> {
    let current: Option<u32> = conn.query_first("SELECT COALESCE(MAX(version), 0) FROM schema_version").await?;
    let mut current = current.unwrap_or(0);
    let known = MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0);
    if current > known {
        tracing::warn!(schema = current, known, "the database schema is newer than this release knows; using it as is");
        return Ok(current);
    }
    let start = current;
    for (version, statement) in MIGRATIONS.iter().filter(|(v, _)| *v > start) {
        conn.query_drop(*statement).await?;
        conn.exec_drop("INSERT INTO schema_version (version) VALUES (?)", (*version,)).await?;
        tracing::info!(version, "storage schema migrated");
        current = *version;
    }
    Ok(current)
}
