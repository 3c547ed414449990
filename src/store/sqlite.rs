//! SQLite backend: WAL, one writer connection (`BEGIN IMMEDIATE`), a small pool of readers.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::{
    HistoryEntry, InboxEntry, InboxEvent, InboxInsert, InboxStats, Record, RecordHead, RecordRow,
    Store, StoreError, StoreTx,
};
use crate::config::SqliteSynchronous;

/// Migrations, applied in order; the version is the position (1-based).
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/0001_core.sql")];

const READERS_KEPT: usize = 4;

/// New inbox rows start with this outcome (the common case), so only the others need an UPDATE.
const DEFAULT_OUTCOME: &str = "applied";

pub struct SqliteStore {
    path: PathBuf,
    synchronous: SqliteSynchronous,
    /// The one writer: SQLite serialises writers anyway; owning it avoids SQLITE_BUSY churn.
    writer: Mutex<Connection>,
    /// Idle read connections; WAL lets them read while the writer commits.
    readers: Mutex<Vec<Connection>>,
    /// Dropping it stops the background checkpointer.
    _checkpointer: Checkpointer,
}

/// Copies the WAL back into the database file from its own thread and connection, so the
/// ingest writer's commits never pay for a checkpoint (the writer's autocheckpoint is off).
struct Checkpointer {
    _stop: std::sync::mpsc::Sender<()>,
}

const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Checkpointer {
    fn start(path: &Path, synchronous: SqliteSynchronous) -> Result<Self, StoreError> {
        let conn = open_connection(path, synchronous)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("subgate-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                    }
                }
            })
            .map_err(|e| StoreError::Failed(format!("cannot start the checkpointer: {e}")))?;
        Ok(Self { _stop: stop })
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let transient = matches!(
            e.sqlite_error_code(),
            Some(
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::OutOfMemory
            )
        );
        if transient {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Failed(e.to_string())
        }
    }
}

impl SqliteStore {
    pub fn open(path: &Path, synchronous: SqliteSynchronous) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let writer = open_connection(path, synchronous)?;
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(Self {
            path: path.to_owned(),
            synchronous,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            _checkpointer: Checkpointer::start(path, synchronous)?,
        })
    }

    /// The writer connection. A panic while it was held (caught by the ingest writer) leaves the
    /// lock poisoned and maybe a transaction open: recover both instead of failing forever.
    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Connection> {
        let conn = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        conn
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.readers.lock().map_err(poisoned)?.pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_connection(&self.path, self.synchronous)?,
        };
        let result = f(&conn);
        let mut readers = self.readers.lock().map_err(poisoned)?;
        if readers.len() < READERS_KEPT {
            readers.push(conn);
        }
        result
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Failed("store lock poisoned by an earlier panic".into())
}

fn open_connection(path: &Path, synchronous: SqliteSynchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match synchronous {
        SqliteSynchronous::Full => "FULL",
        SqliteSynchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -16_000)?;
    // Savepoint (statement) journals in memory: one savepoint per event otherwise writes a
    // temporary file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn to_json(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn read_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        kind: row.get(0)?,
        key: row.get(1)?,
        doc: from_json(&row.get::<_, String>(2)?),
        hash: row.get(3)?,
        occurred_at: row.get(4)?,
        changed_at: row.get(5)?,
        changed_by: row.get(6)?,
        seen_at: row.get(7)?,
        seen_by: row.get(8)?,
        version: row.get(9)?,
    })
}

fn read_history(row: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryEntry> {
    Ok(HistoryEntry {
        kind: row.get(0)?,
        key: row.get(1)?,
        at: row.get(2)?,
        inbox_id: row.get(3)?,
        doc: from_json(&row.get::<_, String>(4)?),
    })
}

const RECORD_COLUMNS: &str =
    "kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version";

/// The ingest transaction on the writer connection.
struct Tx<'c> {
    conn: &'c Connection,
}

impl StoreTx for Tx<'_> {
    fn insert_inbox(&mut self, e: &InboxEntry<'_>) -> Result<InboxInsert, StoreError> {
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO inbox (source, kind, entity, dedupe_key, occurred_at, received_at, meta, raw, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'applied') ON CONFLICT (dedupe_key) DO NOTHING",
        )?;
        let inserted = insert.execute(params![
            e.source,
            e.kind,
            e.entity,
            e.dedupe_key,
            e.occurred_at,
            e.received_at,
            e.meta,
            e.raw
        ])?;
        if inserted == 1 {
            return Ok(InboxInsert::New(self.conn.last_insert_rowid()));
        }
        let mut find = self
            .conn
            .prepare_cached("SELECT id FROM inbox WHERE dedupe_key = ?1")?;
        let id: i64 = find.query_row([e.dedupe_key], |r| r.get(0))?;
        Ok(InboxInsert::Duplicate(id))
    }

    fn set_inbox_outcome(&mut self, id: i64, outcome: &str) -> Result<(), StoreError> {
        if outcome == DEFAULT_OUTCOME {
            return Ok(());
        }
        self.conn
            .prepare_cached("UPDATE inbox SET outcome = ?2 WHERE id = ?1")?
            .execute(params![id, outcome])?;
        Ok(())
    }

    fn get_record(&mut self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        get_record(self.conn, kind, key)
    }

    fn get_record_head(&mut self, kind: &str, key: &str) -> Result<Option<RecordHead>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT hash, occurred_at, version FROM records WHERE kind = ?1 AND key = ?2",
        )?;
        Ok(stmt
            .query_row([kind, key], |r| {
                Ok(RecordHead {
                    hash: r.get(0)?,
                    occurred_at: r.get(1)?,
                    version: r.get(2)?,
                })
            })
            .optional()?)
    }

    fn put_record_row(&mut self, r: &RecordRow<'_>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc, hash = excluded.hash,
                   occurred_at = excluded.occurred_at, changed_at = excluded.changed_at,
                   changed_by = excluded.changed_by, seen_at = excluded.seen_at,
                   seen_by = excluded.seen_by, version = excluded.version",
            )?
            .execute(params![
                r.kind,
                r.key,
                r.doc_json,
                r.hash,
                r.occurred_at,
                r.changed_at,
                r.changed_by,
                r.seen_at,
                r.seen_by,
                r.version
            ])?;
        Ok(())
    }

    fn touch_record(
        &mut self,
        kind: &str,
        key: &str,
        seen_at: i64,
        seen_by: i64,
        occurred_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE records SET seen_at = ?3, seen_by = ?4, occurred_at = ?5
                 WHERE kind = ?1 AND key = ?2",
            )?
            .execute(params![kind, key, seen_at, seen_by, occurred_at])?;
        Ok(())
    }

    fn replace_links(&mut self, kind: &str, from: &str, to: &[String]) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM links WHERE kind = ?1 AND from_key = ?2")?
            .execute(params![kind, from])?;
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO links (kind, from_key, to_key) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?;
        for target in to {
            insert.execute(params![kind, from, target])?;
        }
        Ok(())
    }

    fn append_history(&mut self, h: &HistoryEntry) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO history (kind, key, at, inbox_id, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![h.kind, h.key, h.at, h.inbox_id, to_json(&h.doc)])?;
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.prepare_cached("SAVEPOINT event")?.execute([])?;
        Ok(())
    }

    fn release_savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.prepare_cached("RELEASE event")?.execute([])?;
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("ROLLBACK TO event; RELEASE event")?;
        Ok(())
    }
}

fn get_record(conn: &Connection, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM records WHERE kind = ?1 AND key = ?2"
    ))?;
    Ok(stmt.query_row([kind, key], read_record).optional()?)
}

impl Store for SqliteStore {
    fn migrate(&self) -> Result<usize, StoreError> {
        let conn = self.lock_writer();
        // IMMEDIATE takes the write lock first, so concurrent `migrate` runs serialise and the
        // second one sees the first one's version.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| -> Result<usize, StoreError> {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
            )?;
            let current: i64 = conn.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )?;
            let mut applied = 0;
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i64 + 1;
                if version <= current {
                    continue;
                }
                conn.execute_batch(sql)?;
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                    params![version, crate::clock::now_ms()],
                )?;
                applied += 1;
            }
            Ok(applied)
        })();
        match result {
            Ok(n) => {
                conn.execute_batch("COMMIT")?;
                Ok(n)
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn StoreTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let conn = self.lock_writer();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = f(&mut Tx { conn: &conn });
        match result {
            Ok(()) => match conn.execute_batch("COMMIT") {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    Err(StoreError::Unavailable(format!("commit failed: {e}")))
                }
            },
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        self.with_reader(|c| get_record(c, kind, key))
    }

    fn links_to(&self, kind: &str, to: &str) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT from_key FROM links WHERE kind = ?1 AND to_key = ?2 ORDER BY from_key",
            )?;
            let rows = stmt.query_map([kind, to], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
    }

    fn links_from(&self, kind: &str, from: &str) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT to_key FROM links WHERE kind = ?1 AND from_key = ?2 ORDER BY to_key",
            )?;
            let rows = stmt.query_map([kind, from], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
    }

    fn history(
        &self,
        kind: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT kind, key, at, inbox_id, doc FROM history
                 WHERE kind = ?1 AND key = ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![kind, key, limit as i64], read_history)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn history_between(
        &self,
        kind: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT kind, key, at, inbox_id, doc FROM history
                 WHERE kind = ?1 AND at >= ?2 AND at < ?3 ORDER BY at, id LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![kind, from, to, limit as i64], read_history)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn inbox_event(&self, id: i64) -> Result<Option<InboxEvent>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, source, kind, entity, dedupe_key, occurred_at, received_at, outcome, meta, raw
                 FROM inbox WHERE id = ?1",
            )?;
            Ok(stmt
                .query_row([id], |r| {
                    Ok(InboxEvent {
                        id: r.get(0)?,
                        source: r.get(1)?,
                        kind: r.get(2)?,
                        entity: r.get(3)?,
                        dedupe_key: r.get(4)?,
                        occurred_at: r.get(5)?,
                        received_at: r.get(6)?,
                        outcome: r.get(7)?,
                        meta: from_json(&r.get::<_, String>(8)?),
                        raw: r.get(9)?,
                    })
                })
                .optional()?)
        })
    }

    fn inbox_stats(&self, source: Option<&str>) -> Result<InboxStats, StoreError> {
        self.with_reader(|c| {
            let (events, distinct) = c.query_row(
                "SELECT COUNT(*), COUNT(DISTINCT dedupe_key) FROM inbox WHERE ?1 IS NULL OR source = ?1",
                [source],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(InboxStats {
                events,
                distinct_dedupe_keys: distinct,
            })
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|c| {
            c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
    }
}
