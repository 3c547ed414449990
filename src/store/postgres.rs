//! PostgreSQL backend: several subgate instances share one database.
//!
//! Same model as SQLite (one writer connection per instance for the ingest transaction, a small
//! pool of readers), plus what sharing needs:
//! - the inbox's unique dedupe key decides "first time or replay" across instances (a concurrent
//!   insert of the same key waits for the other transaction, then sees the conflict);
//! - a read-modify-write of a record reads it `FOR UPDATE` (the row stays locked, and a read
//!   that waited sees what the other instance committed) and creates it insert-only (a lost
//!   creation race is a `Conflict`), so two instances changing one customer serialise instead
//!   of losing an update;
//! - deadlocks and serialization failures are [`StoreError::Conflict`]: the ingest writer retries
//!   the batch;
//! - migrations run under a session advisory lock, so `subgate migrate` is safe from several
//!   instances at once.

use std::{collections::HashMap, sync::Mutex};

use postgres::{error::SqlState, types::ToSql, Client, NoTls, Row, Statement};
use serde_json::Value;

use super::{
    HistoryEntry, InboxEntry, InboxEvent, InboxInsert, InboxStats, NewOutboxRow, Record,
    RecordHead, RecordRow, Store, StoreError, StoreTx,
};

const MIGRATIONS: &[&str] = &[include_str!("../../migrations/postgres/0001_core.sql")];
const READERS_KEPT: usize = 4;
/// Session advisory lock key held while migrating ("subgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_7562_6761_7465;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        // `Display` of a server error is only "db error"; the message says what went wrong.
        let text = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        match e.code() {
            Some(code)
                if *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                StoreError::Conflict(text)
            }
            Some(code)
                if code.code().starts_with("08")
                    || code.code().starts_with("53")
                    || code.code().starts_with("57") =>
            {
                StoreError::Unavailable(text)
            }
            Some(_) => StoreError::Failed(text),
            // No SQLSTATE: the connection itself failed.
            None => StoreError::Unavailable(text),
        }
    }
}

/// A connection with its prepared statements (the `postgres` crate does not cache them).
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn open(url: &str) -> Result<Self, StoreError> {
        let client = Client::connect(url, NoTls).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {e}",
                crate::config::redact_url(url)
            ))
        })?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, params)?)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.client.query(&s, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.client.query_opt(&s, params)?)
    }
}

pub struct PostgresStore {
    url: String,
    /// The ingest writer's connection; reopened if it broke.
    writer: Mutex<Option<Conn>>,
    readers: Mutex<Vec<Conn>>,
}

fn to_json(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Failed("store lock poisoned by an earlier panic".into())
}

fn read_record(row: &Row) -> Result<Record, StoreError> {
    Ok(Record {
        kind: row.try_get(0)?,
        key: row.try_get(1)?,
        doc: from_json(row.try_get::<_, &str>(2)?),
        hash: row.try_get(3)?,
        occurred_at: row.try_get(4)?,
        changed_at: row.try_get(5)?,
        changed_by: row.try_get(6)?,
        seen_at: row.try_get(7)?,
        seen_by: row.try_get(8)?,
        version: row.try_get(9)?,
    })
}

fn read_history(row: &Row) -> Result<HistoryEntry, StoreError> {
    Ok(HistoryEntry {
        kind: row.try_get(0)?,
        key: row.try_get(1)?,
        at: row.try_get(2)?,
        inbox_id: row.try_get(3)?,
        doc: from_json(row.try_get::<_, &str>(4)?),
    })
}

impl PostgresStore {
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let writer = Conn::open(url)?;
        Ok(Self {
            url: url.to_owned(),
            writer: Mutex::new(Some(writer)),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.readers.lock().map_err(poisoned)?.pop();
        let mut conn = match pooled {
            Some(c) if !c.client.is_closed() => c,
            _ => Conn::open(&self.url)?,
        };
        let result = f(&mut conn);
        if !conn.client.is_closed() {
            let mut readers = self.readers.lock().map_err(poisoned)?;
            if readers.len() < READERS_KEPT {
                readers.push(conn);
            }
        }
        result
    }

    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = Some(Conn::open(&self.url)?);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(StoreError::Unavailable("no writer connection".into()));
        };
        f(conn)
    }
}

struct Tx<'c> {
    conn: &'c mut Conn,
}

impl StoreTx for Tx<'_> {
    fn insert_inbox(&mut self, e: &InboxEntry<'_>) -> Result<InboxInsert, StoreError> {
        let meta = e.meta;
        let inserted = self.conn.query_opt(
            "INSERT INTO inbox (source, kind, entity, dedupe_key, occurred_at, received_at, meta, raw)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
            &[&e.source, &e.kind, &e.entity, &e.dedupe_key, &e.occurred_at, &e.received_at, &meta, &e.raw],
        )?;
        if let Some(row) = inserted {
            return Ok(InboxInsert::New(row.try_get(0)?));
        }
        let row = self
            .conn
            .query_opt(
                "SELECT id FROM inbox WHERE dedupe_key = $1",
                &[&e.dedupe_key],
            )?
            .ok_or_else(|| StoreError::Conflict("dedupe key vanished".into()))?;
        Ok(InboxInsert::Duplicate(row.try_get(0)?))
    }

    fn set_inbox_outcome(&mut self, id: i64, outcome: &str) -> Result<(), StoreError> {
        if outcome == "applied" {
            return Ok(());
        }
        self.conn.execute(
            "UPDATE inbox SET outcome = $2 WHERE id = $1",
            &[&id, &outcome],
        )?;
        Ok(())
    }

    /// Reads with `FOR UPDATE`: an existing record stays locked until the transaction ends,
    /// and a read that waited for another instance's lock returns what that instance committed
    /// (READ COMMITTED re-reads the row). A record that does not exist yet cannot be locked;
    /// its first write is insert-only (see `put_record_row`), so two instances creating it at
    /// once end in a `Conflict` for one of them, whose batch is written again.
    fn get_record(&mut self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        self.conn
            .query_opt(
                "SELECT kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version
                 FROM records WHERE kind = $1 AND key = $2 FOR UPDATE",
                &[&kind, &key],
            )?
            .map(|r| read_record(&r))
            .transpose()
    }

    fn get_record_head(&mut self, kind: &str, key: &str) -> Result<Option<RecordHead>, StoreError> {
        self.conn
            .query_opt(
                "SELECT hash, occurred_at, version FROM records
                 WHERE kind = $1 AND key = $2 FOR UPDATE",
                &[&kind, &key],
            )?
            .map(|r| {
                Ok(RecordHead {
                    hash: r.try_get(0)?,
                    occurred_at: r.try_get(1)?,
                    version: r.try_get(2)?,
                })
            })
            .transpose()
    }

    /// Version 1 is a creation: insert-only, and a record that appeared meanwhile (another
    /// instance created it after our read found nothing) is a `Conflict`. Later versions replace
    /// a row this transaction holds locked since its read.
    fn put_record_row(&mut self, r: &RecordRow<'_>) -> Result<(), StoreError> {
        if r.version == 1 {
            let inserted = self.conn.execute(
                "INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (kind, key) DO NOTHING",
                &[&r.kind, &r.key, &r.doc_json, &r.hash, &r.occurred_at, &r.changed_at, &r.changed_by, &r.seen_at, &r.seen_by, &r.version],
            )?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "record {}/{} was created concurrently",
                    r.kind, r.key
                )));
            }
            return Ok(());
        }
        self.conn.execute(
            "INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc, hash = excluded.hash,
               occurred_at = excluded.occurred_at, changed_at = excluded.changed_at,
               changed_by = excluded.changed_by, seen_at = excluded.seen_at,
               seen_by = excluded.seen_by, version = excluded.version",
            &[&r.kind, &r.key, &r.doc_json, &r.hash, &r.occurred_at, &r.changed_at, &r.changed_by, &r.seen_at, &r.seen_by, &r.version],
        )?;
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
        self.conn.execute(
            "UPDATE records SET seen_at = $3, seen_by = $4, occurred_at = $5 WHERE kind = $1 AND key = $2",
            &[&kind, &key, &seen_at, &seen_by, &occurred_at],
        )?;
        Ok(())
    }

    fn replace_links(&mut self, kind: &str, from: &str, to: &[String]) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM links WHERE kind = $1 AND from_key = $2",
            &[&kind, &from],
        )?;
        for target in to {
            self.conn.execute(
                "INSERT INTO links (kind, from_key, to_key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&kind, &from, target],
            )?;
        }
        Ok(())
    }

    fn append_history(&mut self, h: &HistoryEntry) -> Result<(), StoreError> {
        let doc = to_json(&h.doc);
        self.conn.execute(
            "INSERT INTO history (kind, key, at, inbox_id, doc) VALUES ($1, $2, $3, $4, $5)",
            &[&h.kind, &h.key, &h.at, &h.inbox_id, &doc],
        )?;
        Ok(())
    }

    fn insert_outbox(&mut self, _row: &NewOutboxRow<'_>) -> Result<i64, StoreError> {
        Err(StoreError::Failed(
            "the PostgreSQL backend has no delivery outbox yet: remove [[destinations]] or use SQLite"
                .into(),
        ))
    }

    // Savepoint commands use the simple-query protocol: after a failed statement the transaction
    // refuses to prepare anything, including the ROLLBACK TO that would repair it.
    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.client.batch_execute("SAVEPOINT event")?;
        Ok(())
    }

    fn release_savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.client.batch_execute("RELEASE SAVEPOINT event")?;
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .client
            .batch_execute("ROLLBACK TO SAVEPOINT event; RELEASE SAVEPOINT event")?;
        Ok(())
    }
}

impl Store for PostgresStore {
    fn migrate(&self) -> Result<usize, StoreError> {
        // A separate connection: the session lock must not outlive this call on a shared one.
        let mut conn = Conn::open(&self.url)?;
        let client = &mut conn.client;
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
        let result = (|| -> Result<usize, StoreError> {
            client.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )?;
            let current: i64 = client
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )?
                .try_get(0)?;
            let mut applied = 0;
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i64 + 1;
                if version <= current {
                    continue;
                }
                let mut tx = client.transaction()?;
                tx.batch_execute(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&version, &crate::clock::now_ms()],
                )?;
                tx.commit()?;
                applied += 1;
            }
            Ok(applied)
        })();
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        result
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn StoreTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.with_writer(|conn| {
            conn.client.batch_execute("BEGIN")?;
            let result = f(&mut Tx { conn: &mut *conn });
            match result {
                Ok(()) => conn.client.batch_execute("COMMIT").map_err(|e| {
                    let e = StoreError::from(e);
                    match e {
                        StoreError::Conflict(_) => e,
                        other => StoreError::Unavailable(format!("commit failed: {other}")),
                    }
                }),
                Err(e) => {
                    let _ = conn.client.batch_execute("ROLLBACK");
                    Err(e)
                }
            }
        })
    }

    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        self.with_reader(|c| {
            c.query_opt(
                "SELECT kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version
                 FROM records WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )?
            .map(|r| read_record(&r))
            .transpose()
        })
    }

    fn links_to(&self, kind: &str, to: &str) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            c.query(
                "SELECT from_key FROM links WHERE kind = $1 AND to_key = $2 ORDER BY from_key",
                &[&kind, &to],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
        })
    }

    fn links_from(&self, kind: &str, from: &str) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            c.query(
                "SELECT to_key FROM links WHERE kind = $1 AND from_key = $2 ORDER BY to_key",
                &[&kind, &from],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
        })
    }

    fn history(
        &self,
        kind: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let limit = limit as i64;
        self.with_reader(|c| {
            c.query(
                "SELECT kind, key, at, inbox_id, doc FROM history
                 WHERE kind = $1 AND key = $2 ORDER BY id LIMIT $3",
                &[&kind, &key, &limit],
            )?
            .iter()
            .map(read_history)
            .collect()
        })
    }

    fn history_between(
        &self,
        kind: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let limit = limit as i64;
        self.with_reader(|c| {
            c.query(
                "SELECT kind, key, at, inbox_id, doc FROM history
                 WHERE kind = $1 AND at >= $2 AND at < $3 ORDER BY at, id LIMIT $4",
                &[&kind, &from, &to, &limit],
            )?
            .iter()
            .map(read_history)
            .collect()
        })
    }

    fn inbox_event(&self, id: i64) -> Result<Option<InboxEvent>, StoreError> {
        self.with_reader(|c| {
            let Some(r) = c.query_opt(
                "SELECT id, source, kind, entity, dedupe_key, occurred_at, received_at, outcome, meta, raw
                 FROM inbox WHERE id = $1",
                &[&id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(InboxEvent {
                id: r.try_get(0)?,
                source: r.try_get(1)?,
                kind: r.try_get(2)?,
                entity: r.try_get(3)?,
                dedupe_key: r.try_get(4)?,
                occurred_at: r.try_get(5)?,
                received_at: r.try_get(6)?,
                outcome: r.try_get(7)?,
                meta: from_json(r.try_get::<_, &str>(8)?),
                raw: r.try_get(9)?,
            }))
        })
    }

    fn inbox_stats(&self, source: Option<&str>) -> Result<InboxStats, StoreError> {
        self.with_reader(|c| {
            let row = c
                .query_opt(
                    "SELECT COUNT(*), COUNT(DISTINCT dedupe_key) FROM inbox
                     WHERE $1::text IS NULL OR source = $1",
                    &[&source],
                )?
                .ok_or_else(|| StoreError::Failed("no row from COUNT".into()))?;
            Ok(InboxStats {
                events: row.try_get(0)?,
                distinct_dedupe_keys: row.try_get(1)?,
            })
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|c| {
            c.query_opt("SELECT 1", &[])?;
            Ok(())
        })
    }
}
