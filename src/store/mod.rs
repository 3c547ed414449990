//! The store: one trait, one module per backend (SQL per dialect, embedded migrations).
//!
//! The state model is deliberately small and backend-neutral so every source's projection is
//! written once, in Rust, against [`StoreTx`]:
//! - `inbox`: every accepted event as received (raw bytes), unique by dedupe key;
//! - `records`: the current state of each entity, `(kind, key) → JSON document` with its content
//!   hash (change detection), the time it describes (`occurred_at`, staleness guard) and the inbox
//!   event that last changed it;
//! - `links`: relations between entities (a subscription's engaged parties, a card's member);
//! - `history`: append-only timelines (consent changes, service-order notifications, …);
//! - `outbox`: one row per real change and matching destination, written in the ingest
//!   transaction and claimed by the delivery workers with a lease (see [`crate::delivery`]);
//!   `delivery_attempts` and `delivery_replays` record what happened to them.

pub mod postgres;
pub mod sqlite;

use serde::Serialize;
use serde_json::Value;

use crate::config::{Settings, StoreUrl};

/// Errors at the store boundary. `Unavailable` is transient (retry later, never ack);
/// `Conflict` is a concurrency failure between instances (deadlock, serialization): retry the
/// transaction at once; `Failed` is specific to the statement that raised it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store conflict: {0}")]
    Conflict(String),
    #[error("store error: {0}")]
    Failed(String),
}

impl StoreError {
    /// What went wrong, without the kind's prefix.
    pub fn message(&self) -> &str {
        match self {
            StoreError::Unavailable(m) | StoreError::Conflict(m) | StoreError::Failed(m) => m,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Conflict(_))
    }
}

/// An event as it enters the inbox.
#[derive(Debug, Clone)]
pub struct InboxEntry<'a> {
    pub source: &'a str,
    pub kind: &'a str,
    pub entity: &'a str,
    pub dedupe_key: &'a str,
    /// Unix milliseconds the event describes, when the upstream says.
    pub occurred_at: Option<i64>,
    /// Unix milliseconds subgate received it.
    pub received_at: i64,
    /// Transport metadata (AMQP properties, HTTP request id, …), serialised JSON.
    pub meta: &'a str,
    pub raw: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxInsert {
    /// First time this dedupe key is seen: the new inbox id.
    New(i64),
    /// Seen before: the id of the first occurrence.
    Duplicate(i64),
}

/// A stored inbox event (read API).
#[derive(Debug, Clone, Serialize)]
pub struct InboxEvent {
    pub id: i64,
    pub source: String,
    pub kind: String,
    pub entity: String,
    pub dedupe_key: String,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    pub outcome: String,
    pub meta: Value,
    #[serde(skip)]
    pub raw: Vec<u8>,
}

/// The current state of one entity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub kind: String,
    pub key: String,
    pub doc: Value,
    /// Hex SHA-256 of the canonical document: equal hash, no change.
    pub hash: String,
    /// Unix ms of the newest event applied (the staleness guard), when known.
    pub occurred_at: Option<i64>,
    /// Unix ms and inbox id of the last real change.
    pub changed_at: i64,
    pub changed_by: i64,
    /// Unix ms and inbox id of the last event about this entity (changes and no-ops).
    pub seen_at: i64,
    pub seen_by: i64,
    /// Incremented on every real change.
    pub version: i64,
}

/// What change detection needs of a record: no document, so nothing to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHead {
    pub hash: String,
    pub occurred_at: Option<i64>,
    pub version: i64,
}

/// A record as written, with its document already serialised.
#[derive(Debug, Clone)]
pub struct RecordRow<'a> {
    pub kind: &'a str,
    pub key: &'a str,
    pub doc_json: &'a str,
    pub hash: &'a str,
    pub occurred_at: Option<i64>,
    pub changed_at: i64,
    pub changed_by: i64,
    pub seen_at: i64,
    pub seen_by: i64,
    pub version: i64,
}

/// One entry of an append-only timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub kind: String,
    pub key: String,
    /// Unix ms the entry is about (used for range queries).
    pub at: i64,
    pub inbox_id: i64,
    pub doc: Value,
}

/// Operations available to projections inside the ingest transaction.
pub trait StoreTx {
    fn insert_inbox(&mut self, entry: &InboxEntry<'_>) -> Result<InboxInsert, StoreError>;
    /// Several inbox entries at once: the same answers, in the same order, as calling
    /// [`StoreTx::insert_inbox`] for each in turn (a key repeated within `entries` is
    /// `Duplicate` of its first occurrence).
    fn insert_inbox_batch(
        &mut self,
        entries: &[InboxEntry<'_>],
    ) -> Result<Vec<InboxInsert>, StoreError> {
        entries.iter().map(|e| self.insert_inbox(e)).collect()
    }
    /// Lock and read, ahead of time, records this transaction is about to read-modify-write
    /// (see [`crate::envelope::Change::record_keys`]). A backend may then answer
    /// `get_record_head` for them from memory and hold back writes to them (and inbox outcomes)
    /// until [`StoreTx::flush`]; reads inside the transaction always see its own writes.
    /// Default: nothing to do (each record is locked and read when asked for).
    fn prefetch_records(&mut self, _keys: &[(&str, &str)]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Write whatever is held back. The backend flushes before commit anyway; the ingest
    /// pipeline calls it itself so that a failing write is seen while it can still write the
    /// batch again event by event. Default: nothing held back.
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn set_inbox_outcome(&mut self, id: i64, outcome: &str) -> Result<(), StoreError>;
    fn get_record(&mut self, kind: &str, key: &str) -> Result<Option<Record>, StoreError>;
    /// Hash, time and version of a record (locks it like `get_record` does).
    fn get_record_head(&mut self, kind: &str, key: &str) -> Result<Option<RecordHead>, StoreError>;
    /// Insert or replace a record.
    fn put_record_row(&mut self, row: &RecordRow<'_>) -> Result<(), StoreError>;
    /// A no-op event: only "last seen" and the newest `occurred_at` move.
    fn touch_record(
        &mut self,
        kind: &str,
        key: &str,
        seen_at: i64,
        seen_by: i64,
        occurred_at: Option<i64>,
    ) -> Result<(), StoreError>;
    fn put_record(&mut self, record: &Record) -> Result<(), StoreError> {
        let doc_json = serde_json::to_string(&record.doc)
            .map_err(|e| StoreError::Failed(format!("cannot serialise a record: {e}")))?;
        self.put_record_row(&RecordRow {
            kind: &record.kind,
            key: &record.key,
            doc_json: &doc_json,
            hash: &record.hash,
            occurred_at: record.occurred_at,
            changed_at: record.changed_at,
            changed_by: record.changed_by,
            seen_at: record.seen_at,
            seen_by: record.seen_by,
            version: record.version,
        })
    }
    /// Make `from`'s links of this kind exactly `to`.
    fn replace_links(&mut self, kind: &str, from: &str, to: &[String]) -> Result<(), StoreError>;
    fn append_history(&mut self, entry: &HistoryEntry) -> Result<(), StoreError>;
    /// Nested transaction, so one event's failure does not abort its batch.
    fn savepoint(&mut self) -> Result<(), StoreError>;
    fn release_savepoint(&mut self) -> Result<(), StoreError>;
    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError>;
    /// Queue one delivery (the ingest pipeline, after a real change); returns the row id.
    fn insert_outbox(&mut self, row: &NewOutboxRow<'_>) -> Result<i64, StoreError>;
}

/// Counts of what the store holds (ops and tests).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct InboxStats {
    pub events: i64,
    pub distinct_dedupe_keys: i64,
}

/// A backend. Methods block; async callers use `spawn_blocking`. Writes go through
/// [`Store::write`], which runs `f` in one transaction (`BEGIN IMMEDIATE` on SQLite).
pub trait Store: Send + Sync + 'static {
    /// Apply pending migrations; returns how many were applied.
    fn migrate(&self) -> Result<usize, StoreError>;
    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn StoreTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Record>, StoreError>;
    /// Keys `from` such that `from → to` is a link of `kind`.
    fn links_to(&self, kind: &str, to: &str) -> Result<Vec<String>, StoreError>;
    fn links_from(&self, kind: &str, from: &str) -> Result<Vec<String>, StoreError>;
    fn history(&self, kind: &str, key: &str, limit: usize)
        -> Result<Vec<HistoryEntry>, StoreError>;
    /// Entries of `kind` with `from <= at < to`, oldest first.
    fn history_between(
        &self,
        kind: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError>;
    fn inbox_event(&self, id: i64) -> Result<Option<InboxEvent>, StoreError>;
    fn inbox_stats(&self, source: Option<&str>) -> Result<InboxStats, StoreError>;
    /// Cheap liveness check for `/readyz`.
    fn ping(&self) -> Result<(), StoreError>;

    // The outbox (delivery). Defaults answer "not supported" so wrappers and test doubles need
    // not implement them; every backend does.

    /// In one short transaction, lease up to `limit` due rows of one destination: pending,
    /// `next_attempt_at <= now`, not leased (or the lease expired), and with no earlier pending
    /// row of the same ordering key (commit order per destination and entity). With `coalesce`,
    /// a claimed snapshot row with later pending snapshot rows of the same key is marked
    /// `superseded` and the latest is claimed in its place (carrying its attempt count).
    fn claim_deliveries(&self, _claim: &ClaimRequest) -> Result<Vec<OutboxRow>, StoreError> {
        Err(no_outbox())
    }
    /// Record attempts and move their rows on (delivered, rescheduled or dead), releasing the
    /// lease; rows whose lease `owner` no longer holds are left alone (the attempt is kept).
    fn record_attempts(
        &self,
        _destination: &str,
        _owner: &str,
        _attempts: &[AttemptRecord],
    ) -> Result<(), StoreError> {
        Err(no_outbox())
    }
    /// [`Store::record_attempts`] then [`Store::claim_deliveries`], in one transaction where the
    /// backend can (the worker's steady state: one commit per batch).
    fn record_then_claim(
        &self,
        attempts: &[AttemptRecord],
        claim: &ClaimRequest,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.record_attempts(&claim.destination, &claim.owner, attempts)?;
        self.claim_deliveries(claim)
    }
    /// Release every lease `owner` holds on `destination`'s rows (graceful shutdown, or a
    /// provider's `Retry-After`); returns how many. The destination bounds the search to its
    /// pending rows (SQLite has no index on the lease owner, and delivered history can be
    /// millions of rows).
    fn release_leases(&self, _destination: &str, _owner: &str) -> Result<usize, StoreError> {
        Err(no_outbox())
    }
    /// Rows matching the filter, oldest first.
    fn list_deliveries(&self, _filter: &DeliveryFilter) -> Result<Vec<OutboxRow>, StoreError> {
        Err(no_outbox())
    }
    fn delivery(&self, _id: i64) -> Result<Option<OutboxRow>, StoreError> {
        Err(no_outbox())
    }
    /// The attempts of one row, oldest first.
    fn delivery_attempts(&self, _outbox_id: i64) -> Result<Vec<AttemptRow>, StoreError> {
        Err(no_outbox())
    }
    /// Make matching dead rows pending again (attempts reset, due now) and record the replay.
    fn replay_dead(&self, _replay: &ReplayRequest) -> Result<ReplayOutcome, StoreError> {
        Err(no_outbox())
    }
    /// One destination's pending depth, oldest pending row and dead count (metrics).
    fn delivery_stats(&self, _destination: &str) -> Result<DestinationStats, StoreError> {
        Err(no_outbox())
    }
    /// Delete up to `limit` delivered or superseded rows that finished before `before` (unix
    /// ms), oldest first, with their attempts and their payloads once no row uses them; returns
    /// how many rows went. Pending and dead rows are never touched.
    fn purge_finished(&self, _before: i64, _limit: usize) -> Result<usize, StoreError> {
        Err(no_outbox())
    }
}

fn no_outbox() -> StoreError {
    StoreError::Failed("this store does not implement the delivery outbox".into())
}

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its first attempt or a retry (or leased by a worker right now).
    Pending,
    /// A 2xx (or a broker confirm) came back.
    Delivered,
    /// A permanent error, or the retry schedule ran out; kept for `replay`.
    Dead,
    /// A later snapshot of the same entity was sent in its place (Emarsys contacts).
    Superseded,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
            DeliveryState::Superseded => "superseded",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "dead" => Some(DeliveryState::Dead),
            "superseded" => Some(DeliveryState::Superseded),
            _ => None,
        }
    }
}

/// A delivery as the ingest pipeline queues it.
#[derive(Debug, Clone)]
pub struct NewOutboxRow<'a> {
    pub destination: &'a str,
    pub source: &'a str,
    pub kind: &'a str,
    /// Ordering and coalescing key: the record, `source:record:entity` (`akinon:user:1`).
    pub entity: &'a str,
    /// Second ordering key: the contact the row tells the provider about (`email:…`,
    /// `phone:+…`), so rows about one person from different records go out in commit order.
    pub contact_key: Option<&'a str>,
    pub inbox_id: i64,
    /// The canonical event JSON.
    pub payload: &'a str,
    /// A snapshot that a later pending row of the same key may replace.
    pub coalesce: bool,
    /// The destination's retry schedule, comma-separated milliseconds.
    pub schedule: &'a str,
    pub created_at: i64,
}

/// A stored outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub destination: String,
    pub source: String,
    pub kind: String,
    pub entity: String,
    pub contact_key: Option<String>,
    pub inbox_id: i64,
    #[serde(skip)]
    pub payload: String,
    pub coalesce: bool,
    pub schedule: String,
    pub created_at: i64,
    pub state: DeliveryState,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub locked_until: Option<i64>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub last_response: Option<String>,
    pub finished_at: Option<i64>,
    pub superseded_by: Option<i64>,
    pub replays: i64,
}

/// What a worker asks for when it claims.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub destination: String,
    /// Who holds the lease (one id per worker).
    pub owner: String,
    pub now: i64,
    pub lease_until: i64,
    pub limit: usize,
    pub coalesce: bool,
}

/// One attempt's result, as the worker decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Delivered,
    Retry { next_attempt_at: i64 },
    Dead,
}

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Delivered => "delivered",
            AttemptResult::Retry { .. } => "retry",
            AttemptResult::Dead => "dead",
        }
    }
}

/// One attempt to record.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub outbox_id: i64,
    /// 1 for the first attempt.
    pub attempt: i64,
    pub started_at: i64,
    pub latency_ms: i64,
    pub result: AttemptResult,
    /// The HTTP status, when a response came back.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The start of the response body (kept for non-2xx answers).
    pub response: Option<String>,
}

impl AttemptRecord {
    /// What recording this attempt writes to its outbox row: (state, next attempt, finished at).
    pub fn row_outcome(&self) -> (&'static str, Option<i64>, Option<i64>) {
        let finished = Some(self.started_at + self.latency_ms);
        match self.result {
            AttemptResult::Delivered => ("delivered", None, finished),
            AttemptResult::Dead => ("dead", None, finished),
            AttemptResult::Retry { next_attempt_at } => ("pending", Some(next_attempt_at), None),
        }
    }
}

/// A stored attempt.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttemptRow {
    pub attempt: i64,
    pub started_at: i64,
    pub latency_ms: i64,
    pub outcome: String,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub response: Option<String>,
    pub next_attempt_at: Option<i64>,
}

/// Which rows `list_deliveries` returns.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub state: Option<DeliveryState>,
    pub destination: Option<String>,
    /// Rows created at or after (Unix ms).
    pub since: Option<i64>,
    /// Rows with a larger id (paging).
    pub after_id: Option<i64>,
    pub limit: usize,
}

/// Which dead rows a replay revives, and who asked.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub destination: Option<String>,
    /// Dead rows created at or after (Unix ms).
    pub since: Option<i64>,
    /// `cli` or `api` (recorded with the replay).
    pub actor: String,
    pub now: i64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// The `delivery_replays` row.
    pub replay_id: i64,
    pub rows: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DestinationStats {
    pub destination: String,
    pub pending: i64,
    /// Creation time (Unix ms) of the oldest pending row.
    pub oldest_pending_at: Option<i64>,
    pub dead: i64,
}

/// Open the backend `store.url` names.
pub fn open(settings: &Settings) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match StoreUrl::parse(&settings.store.url).map_err(|e| StoreError::Failed(e.to_string()))? {
        StoreUrl::Sqlite(path) => {
            if let Some(dir) = sqlite::missing_directory(&path) {
                return Err(StoreError::Failed(format!(
                    "store.url: the directory {} does not exist (subgate does not create it)",
                    dir.display()
                )));
            }
            Ok(std::sync::Arc::new(sqlite::SqliteStore::open(
                &path,
                settings.store.sqlite_synchronous,
            )?))
        }
        StoreUrl::Postgres(url) => {
            let options = postgres::PostgresOptions {
                pool_size: settings.store.pool_size,
                pool_timeout: settings.store.pool_timeout,
                statement_timeout: settings.store.statement_timeout,
                tls_ca_file: settings.store.tls_ca_file.clone(),
            };
            Ok(std::sync::Arc::new(postgres::PostgresStore::open_with(
                &url, &options,
            )?))
        }
    }
}

/// Hex SHA-256 of a JSON document's serialisation (change detection).
pub fn content_hash(doc: &Value) -> String {
    hash_bytes(&serde_json::to_vec(doc).unwrap_or_default())
}

/// Hex SHA-256 of serialised bytes.
pub fn hash_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
