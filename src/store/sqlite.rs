//! SQLite backend: WAL, one writer connection (`BEGIN IMMEDIATE`), a small pool of readers.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use rusqlite::{params, CachedStatement, Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::{
    AttemptRecord, AttemptRow, ClaimRequest, DeliveryFilter, DeliveryState, DestinationStats,
    HistoryEntry, InboxEntry, InboxEvent, InboxInsert, InboxStats, NewOutboxRow, OutboxRow, Record,
    RecordHead, RecordRow, ReplayOutcome, ReplayRequest, Store, StoreError, StoreTx,
};
use crate::config::SqliteSynchronous;

/// Migrations, applied in order; the version is the position (1-based). Public for the tests
/// that build a database as an earlier version left it.
#[doc(hidden)]
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_core.sql"),
    include_str!("../../migrations/sqlite/0002_outbox.sql"),
    include_str!("../../migrations/sqlite/0003_drop_inbox_entity_index.sql"),
    include_str!("../../migrations/sqlite/0004_outbox_retention.sql"),
    include_str!("../../migrations/sqlite/0005_records_by_rowid.sql"),
    include_str!("../../migrations/sqlite/0006_outbox_record_and_contact_keys.sql"),
];

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

/// Often enough that each checkpoint has little to copy and to sync: with 250 ms, under the
/// Akinon HTTP load the writer's own rewinds copied more (0.6 s of 8 s), and the fsync of a large
/// batch of database pages sometimes held a commit for 0.1–0.5 s (subscribe-user p99 20–142 ms
/// in three runs, against 15–18 ms with 50 ms). Rarer, not gone: a later run still had 77 ms.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// WAL length (frames of one page) past which the writer finishes the checkpoint itself.
///
/// Under a steady stream of commits the background checkpointer never catches up with the very
/// last frame, and SQLite only rewinds the WAL to its start when a write begins with everything
/// checkpointed: without this the WAL grows for as long as the load lasts (400 MB for 200,000 ERP
/// messages), and every commit pays for new file blocks. The writer's own PASSIVE checkpoint only
/// copies the few frames the background one has not reached yet, then the next write rewinds.
const WAL_REWIND_FRAMES: i32 = 4096;

/// After a rewind, a WAL larger than this is truncated back to it (SQLite's journal_size_limit).
const WAL_SIZE_LIMIT: i64 = 2 * 4096 * 4200;

thread_local! {
    /// Frames in the WAL after the last commit on this thread, from SQLite's WAL hook (the hook
    /// runs inside COMMIT on the committing thread; `in_write_tx` reads it right after).
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::os::raw::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

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
        // The directory is the operator's: a typo in the path must not silently create a
        // fresh, empty store somewhere else.
        if let Some(dir) = missing_directory(path) {
            return Err(StoreError::Failed(format!(
                "the directory {} does not exist",
                dir.display()
            )));
        }
        let writer = open_connection(path, synchronous)?;
        // Turning autocheckpoint off removes SQLite's own WAL hook; ours only counts frames.
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        writer.wal_hook(Some(note_wal_frames));
        writer.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
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

/// Checkpoint what the background checkpointer has not reached yet, so that the next write
/// rewinds the WAL (see `WAL_REWIND_FRAMES`). Runs after a commit: a failure here is logged, the
/// commit stands.
fn finish_checkpoint(conn: &Connection) {
    let started = std::time::Instant::now();
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    });
    match result {
        Ok((busy, frames, done)) => {
            metrics::histogram!("subgate_wal_rewind_checkpoint_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(busy, frames, done, "writer finished a WAL checkpoint");
        }
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint by the writer failed"),
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Failed("store lock poisoned by an earlier panic".into())
}

/// The parent directory of a database path when it does not exist (`subgate.db`, a bare file
/// name, lives in the current directory, which always exists).
pub fn missing_directory(path: &Path) -> Option<&Path> {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
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
    /// The last outbox payload written and its id: the rows of one event for several
    /// destinations share it.
    last_payload: Option<(String, i64)>,
    hot: HotStatements<'c>,
}

/// The statements every ingested event runs, held for the whole transaction: taking one from
/// rusqlite's statement cache hashes its whole SQL text, every time.
#[derive(Default)]
struct HotStatements<'c> {
    insert_inbox: Option<CachedStatement<'c>>,
    record_head: Option<CachedStatement<'c>>,
    put_record: Option<CachedStatement<'c>>,
}

fn hot<'s, 'c>(
    slot: &'s mut Option<CachedStatement<'c>>,
    conn: &'c Connection,
    sql: &str,
) -> Result<&'s mut CachedStatement<'c>, StoreError> {
    Ok(match slot {
        Some(stmt) => stmt,
        None => slot.insert(conn.prepare_cached(sql)?),
    })
}

impl StoreTx for Tx<'_> {
    fn insert_inbox(&mut self, e: &InboxEntry<'_>) -> Result<InboxInsert, StoreError> {
        let insert = hot(
            &mut self.hot.insert_inbox,
            self.conn,
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
        let stmt = hot(
            &mut self.hot.record_head,
            self.conn,
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
        hot(
            &mut self.hot.put_record,
            self.conn,
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
        // A payload written since the savepoint is gone with it: never reuse its id.
        self.last_payload = None;
        self.conn
            .execute_batch("ROLLBACK TO event; RELEASE event")?;
        Ok(())
    }

    fn insert_outbox(&mut self, r: &NewOutboxRow<'_>) -> Result<i64, StoreError> {
        let payload_id = match &self.last_payload {
            Some((text, id)) if text == r.payload => *id,
            _ => {
                self.conn
                    .prepare_cached("INSERT INTO outbox_payloads (payload) VALUES (?1)")?
                    .execute([r.payload])?;
                let id = self.conn.last_insert_rowid();
                self.last_payload = Some((r.payload.to_owned(), id));
                id
            }
        };
        self.conn
            .prepare_cached(
                "INSERT INTO outbox (destination, source, kind, entity, inbox_id, payload_id,
                                     coalesce, schedule, created_at, next_attempt_at, contact_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
            )?
            .execute(params![
                r.destination,
                r.source,
                r.kind,
                r.entity,
                r.inbox_id,
                payload_id,
                r.coalesce,
                r.schedule,
                r.created_at,
                r.contact_key
            ])?;
        Ok(self.conn.last_insert_rowid())
    }
}

const OUTBOX_COLUMNS: &str = "id, destination, source, kind, entity, inbox_id,
    (SELECT p.payload FROM outbox_payloads p WHERE p.id = payload_id), coalesce,
    schedule, created_at, state, attempts, next_attempt_at, locked_until, last_status, last_error,
    last_response, finished_at, superseded_by, replays, contact_key";

/// [`OUTBOX_COLUMNS`] for the claim, which joins the payload (`p`) to the row (`o`): a join opens
/// the payload cursor once per statement, where the scalar subquery opens it once per row (about
/// 6% of the claim query's CPU). The guard stays a `NOT EXISTS`: written as `LEFT JOIN … IS NULL`
/// it would walk every earlier pending row of a key (36 s for one claim behind 20,000 pending
/// rows of one key, against 19 ms).
const CLAIM_COLUMNS: &str = "o.id, o.destination, o.source, o.kind, o.entity, o.inbox_id,
    p.payload, o.coalesce, o.schedule, o.created_at, o.state, o.attempts, o.next_attempt_at,
    o.locked_until, o.last_status, o.last_error, o.last_response, o.finished_at, o.superseded_by,
    o.replays, o.contact_key";

/// The text of `list_deliveries` for a state filter and whether a destination is given
/// (parameters: ?1 destination, ?2 since, ?3 after id, ?4 limit). The state and the presence of
/// the destination are part of the text: a dead or pending row is found through its state's
/// partial index (by destination when one is given) instead of a walk in id order through the
/// delivered history, which SQLite chose when the state was a parameter: `--dead` read the whole
/// outbox (23 ms for 3 dead rows among 100,000 delivered ones; 0.04 ms through the index). Dead
/// and pending rows are usually the few, so each page sorts them all by id: in a backlog a page
/// of the pending listing costs more (28 ms at 100,000 pending rows, against 0.7 ms in id order).
#[doc(hidden)]
pub fn list_deliveries_sql(state: Option<DeliveryState>, by_destination: bool) -> String {
    let index = match state {
        Some(DeliveryState::Dead) => " INDEXED BY outbox_dead",
        Some(DeliveryState::Pending) => " INDEXED BY outbox_pending_entity",
        _ => "",
    };
    let state = state.map_or(String::new(), |s| format!("state = '{}' AND ", s.as_str()));
    let destination = if by_destination {
        "destination = ?1"
    } else {
        "?1 IS NULL"
    };
    format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox{index}
         WHERE {state}{destination} AND (?2 IS NULL OR created_at >= ?2)
           AND id > COALESCE(?3, 0)
         ORDER BY id LIMIT ?4"
    )
}

fn read_outbox(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    let state: String = row.get(10)?;
    Ok(OutboxRow {
        id: row.get(0)?,
        destination: row.get(1)?,
        source: row.get(2)?,
        kind: row.get(3)?,
        entity: row.get(4)?,
        inbox_id: row.get(5)?,
        payload: row.get(6)?,
        coalesce: row.get(7)?,
        schedule: row.get(8)?,
        created_at: row.get(9)?,
        state: DeliveryState::parse(&state).unwrap_or(DeliveryState::Pending),
        attempts: row.get(11)?,
        next_attempt_at: row.get(12)?,
        locked_until: row.get(13)?,
        last_status: row.get(14)?,
        last_error: row.get(15)?,
        last_response: row.get(16)?,
        finished_at: row.get(17)?,
        superseded_by: row.get(18)?,
        replays: row.get(19)?,
        contact_key: row.get(20)?,
    })
}

/// Run `f` in one delivery-bookkeeping transaction without waiting for the disk: in WAL mode
/// with `synchronous = NORMAL` the commit is durable once the next fsync happens (the next
/// ingest commit, or a checkpoint). Losing such a commit to a power cut only means a claim is
/// forgotten (the row is claimed again) or a delivery is sent again: at least once holds. The
/// outbox rows themselves are written by ingest, with the configured durability.
fn in_bookkeeping_tx<T>(
    conn: &Connection,
    synchronous: SqliteSynchronous,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if synchronous == SqliteSynchronous::Normal {
        return in_write_tx(conn, f);
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL")?;
    let result = in_write_tx(conn, f);
    let restored = conn.execute_batch("PRAGMA synchronous = FULL");
    let value = result?;
    restored?;
    Ok(value)
}

/// Run `f` in one write transaction on the writer connection (`BEGIN IMMEDIATE`). Every writer
/// commit (ingest and delivery bookkeeping alike) checks the WAL's length after it.
fn in_write_tx<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match f(conn) {
        Ok(v) => match conn.execute_batch("COMMIT") {
            Ok(()) => {
                if WAL_FRAMES.replace(0) > WAL_REWIND_FRAMES {
                    finish_checkpoint(conn);
                }
                Ok(v)
            }
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

/// The claim's read: up to `limit` due, unleased heads of their record and of their contact
/// (parameters: ?1 destination, ?2 now), oldest due first, with their payloads.
#[doc(hidden)]
pub fn claim_heads_sql(limit: i64) -> String {
    format!(
        "SELECT {CLAIM_COLUMNS} FROM outbox o JOIN outbox_payloads p ON p.id = o.payload_id
         WHERE o.destination = ?1 AND o.state = 'pending' AND o.next_attempt_at <= ?2
           AND (o.locked_until IS NULL OR o.locked_until <= ?2)
           AND NOT EXISTS (SELECT 1 FROM outbox e
                           WHERE e.destination = o.destination AND e.entity = o.entity
                             AND e.state = 'pending' AND e.id < o.id)
           AND (o.contact_key IS NULL
                OR NOT EXISTS (SELECT 1 FROM outbox c INDEXED BY outbox_pending_contact
                               WHERE c.destination = o.destination
                                 AND c.contact_key = o.contact_key
                                 AND c.state = 'pending' AND c.id < o.id))
         ORDER BY o.next_attempt_at, o.id LIMIT {limit}"
    )
}

fn claim_deliveries(conn: &Connection, c: &ClaimRequest) -> Result<Vec<OutboxRow>, StoreError> {
    // Heads only: a row with an earlier pending row of the same key waits for it. Read them
    // (straight from the due index, in order), then lease them all in one statement; the
    // transaction holds the write lock, so nothing changes in between. (One `UPDATE …
    // RETURNING` costs more: SQLite buffers the returned rows, payloads included, in a temporary
    // table before handing out the first.) The limit is part of the text, not a parameter:
    // SQLite plans around a bound LIMIT's value, so a statement with `LIMIT ?` is compiled again
    // every time it is bound (a worker's limit does not change: its statement stays cached).
    let limit = i64::try_from(c.limit).unwrap_or(i64::MAX);
    let mut heads = conn
        .prepare_cached(&claim_heads_sql(limit))?
        .query_map(params![c.destination, c.now], read_outbox)?
        .collect::<Result<Vec<_>, _>>()?;
    if heads.is_empty() {
        return Ok(heads);
    }
    let ids = format!(
        "[{}]",
        heads
            .iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    conn.prepare_cached(
        "UPDATE outbox SET locked_until = ?2, lease_owner = ?3
         WHERE id IN (SELECT value FROM json_each(?1))",
    )?
    .execute(params![ids, c.lease_until, c.owner])?;
    for head in heads.iter_mut() {
        head.locked_until = Some(c.lease_until);
    }
    if c.coalesce {
        for head in heads.iter_mut() {
            if head.coalesce {
                coalesce_into_latest(conn, c, head)?;
            }
        }
    }
    Ok(heads)
}

/// Replace `head` by the latest of the run of pending snapshot rows of its key that follows it;
/// the rows in between are marked superseded.
fn coalesce_into_latest(
    conn: &Connection,
    c: &ClaimRequest,
    head: &mut OutboxRow,
) -> Result<(), StoreError> {
    let later: Vec<(i64, bool)> = conn
        .prepare_cached(
            "SELECT id, coalesce FROM outbox
             WHERE destination = ?1 AND entity = ?2 AND state = 'pending' AND id > ?3
             ORDER BY id",
        )?
        .query_map(params![c.destination, head.entity, head.id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    // A pending row of another record about the same contact is a barrier: jumping over it
    // would send this contact's newer state before an older one.
    let barrier: Option<i64> = match &head.contact_key {
        Some(contact) => conn
            .prepare_cached(
                "SELECT min(id) FROM outbox INDEXED BY outbox_pending_contact
                 WHERE destination = ?1 AND contact_key = ?2 AND state = 'pending' AND id > ?3
                   AND entity <> ?4",
            )?
            .query_row(params![c.destination, contact, head.id, head.entity], |r| {
                r.get(0)
            })?,
        None => None,
    };
    let Some(latest) = later
        .iter()
        .take_while(|(id, snapshot)| *snapshot && barrier.is_none_or(|b| *id < b))
        .last()
        .map(|(id, _)| *id)
    else {
        return Ok(());
    };
    conn.prepare_cached(
        "UPDATE outbox SET state = 'superseded', superseded_by = ?4, finished_at = ?5,
                locked_until = NULL, lease_owner = NULL
         WHERE destination = ?1 AND entity = ?2 AND state = 'pending' AND id >= ?3 AND id < ?4",
    )?
    .execute(params![c.destination, head.entity, head.id, latest, c.now])?;
    conn.prepare_cached(
        "UPDATE outbox SET attempts = ?2, locked_until = ?3, lease_owner = ?4 WHERE id = ?1",
    )?
    .execute(params![latest, head.attempts, c.lease_until, c.owner])?;
    let replacement = conn
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?1"
        ))?
        .query_row([latest], read_outbox)?;
    *head = replacement;
    Ok(())
}

fn record_attempts(
    conn: &Connection,
    destination: &str,
    owner: &str,
    attempts: &[AttemptRecord],
) -> Result<(), StoreError> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO delivery_attempts (outbox_id, destination, attempt, started_at, latency_ms,
                                        outcome, status, error, response, next_attempt_at)
         VALUES (?1, ?10, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    let mut update = conn.prepare_cached(
        "UPDATE outbox SET state = ?2, attempts = ?3, next_attempt_at = COALESCE(?4, next_attempt_at),
                locked_until = NULL, lease_owner = NULL, last_status = ?5, last_error = ?6,
                last_response = ?7, finished_at = ?8
         WHERE id = ?1 AND state = 'pending' AND lease_owner = ?9",
    )?;
    for a in attempts {
        let (state, next, finished) = a.row_outcome();
        insert.execute(params![
            a.outbox_id,
            a.attempt,
            a.started_at,
            a.latency_ms,
            a.result.as_str(),
            a.status,
            a.error,
            a.response,
            next,
            destination
        ])?;
        update.execute(params![
            a.outbox_id,
            state,
            a.attempt,
            next,
            a.status,
            a.error,
            a.response,
            finished,
            owner
        ])?;
    }
    Ok(())
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
        in_write_tx(&conn, |c| {
            f(&mut Tx {
                conn: c,
                last_payload: None,
                hot: HotStatements::default(),
            })
        })
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

    fn claim_deliveries(&self, claim: &ClaimRequest) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.lock_writer();
        in_bookkeeping_tx(&conn, self.synchronous, |c| claim_deliveries(c, claim))
    }

    fn record_attempts(
        &self,
        destination: &str,
        owner: &str,
        attempts: &[AttemptRecord],
    ) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let conn = self.lock_writer();
        in_bookkeeping_tx(&conn, self.synchronous, |c| {
            record_attempts(c, destination, owner, attempts)
        })
    }

    fn record_then_claim(
        &self,
        attempts: &[AttemptRecord],
        claim: &ClaimRequest,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.lock_writer();
        in_bookkeeping_tx(&conn, self.synchronous, |c| {
            record_attempts(c, &claim.destination, &claim.owner, attempts)?;
            claim_deliveries(c, claim)
        })
    }

    fn release_leases(&self, destination: &str, owner: &str) -> Result<usize, StoreError> {
        let conn = self.lock_writer();
        in_write_tx(&conn, |c| {
            // Through `outbox_pending_entity` (destination, pending): without the destination
            // this was a scan of the whole outbox, delivered history included, under the write
            // lock.
            Ok(c.prepare_cached(
                "UPDATE outbox SET locked_until = NULL, lease_owner = NULL
                 WHERE destination = ?1 AND state = 'pending' AND lease_owner = ?2",
            )?
            .execute([destination, owner])?)
        })
    }

    fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<OutboxRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt =
                c.prepare_cached(&list_deliveries_sql(f.state, f.destination.is_some()))?;
            let rows = stmt.query_map(
                params![f.destination, f.since, f.after_id, f.limit as i64],
                read_outbox,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn delivery(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?1"
            ))?
            .query_row([id], read_outbox)
            .optional()?)
        })
    }

    fn delivery_attempts(&self, outbox_id: i64) -> Result<Vec<AttemptRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT attempt, started_at, latency_ms, outcome, status, error, response,
                        next_attempt_at
                 FROM delivery_attempts WHERE outbox_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([outbox_id], |r| {
                Ok(AttemptRow {
                    attempt: r.get(0)?,
                    started_at: r.get(1)?,
                    latency_ms: r.get(2)?,
                    outcome: r.get(3)?,
                    status: r.get(4)?,
                    error: r.get(5)?,
                    response: r.get(6)?,
                    next_attempt_at: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn replay_dead(&self, r: &ReplayRequest) -> Result<ReplayOutcome, StoreError> {
        let conn = self.lock_writer();
        in_write_tx(&conn, |c| {
            let rows = c
                .prepare_cached(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?3,
                            locked_until = NULL, lease_owner = NULL, finished_at = NULL,
                            replays = replays + 1
                     WHERE state = 'dead' AND (?1 IS NULL OR destination = ?1)
                       AND (?2 IS NULL OR created_at >= ?2)",
                )?
                .execute(params![r.destination, r.since, r.now])?;
            c.prepare_cached(
                "INSERT INTO delivery_replays (at, actor, destination, since, rows)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![r.now, r.actor, r.destination, r.since, rows as i64])?;
            Ok(ReplayOutcome {
                replay_id: c.last_insert_rowid(),
                rows: rows as i64,
            })
        })
    }

    fn delivery_stats(&self, destination: &str) -> Result<DestinationStats, StoreError> {
        self.with_reader(|c| {
            // Literal states, so the partial indexes apply.
            let (pending, oldest_pending_at) = c
                .prepare_cached(
                    "SELECT COUNT(*), MIN(created_at) FROM outbox
                     WHERE destination = ?1 AND state = 'pending'",
                )?
                .query_row([destination], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let dead = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM outbox WHERE destination = ?1 AND state = 'dead'",
                )?
                .query_row([destination], |r| r.get(0))?;
            Ok(DestinationStats {
                destination: destination.to_owned(),
                pending,
                oldest_pending_at,
                dead,
            })
        })
    }

    fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let conn = self.lock_writer();
        in_write_tx(&conn, |c| {
            // Old finished rows have the smallest ids: the scan in id order stops early.
            let doomed: Vec<(i64, i64)> = c
                .prepare_cached(
                    "SELECT id, payload_id FROM outbox
                     WHERE state IN ('delivered', 'superseded') AND finished_at < ?1
                     ORDER BY id LIMIT ?2",
                )?
                .query_map(params![before, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut attempts =
                c.prepare_cached("DELETE FROM delivery_attempts WHERE outbox_id = ?1")?;
            let mut rows = c.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for (id, _) in &doomed {
                attempts.execute([id])?;
                rows.execute([id])?;
            }
            let mut payloads = c.prepare_cached(
                "DELETE FROM outbox_payloads WHERE id = ?1
                   AND NOT EXISTS (SELECT 1 FROM outbox WHERE payload_id = ?1)",
            )?;
            for (_, payload) in &doomed {
                payloads.execute([payload])?;
            }
            Ok(doomed.len())
        })
    }
}
