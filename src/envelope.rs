//! The envelope: what every source turns an accepted input into, and the contract a decoded
//! payload fulfils to be projected ([`Change`]).

use std::fmt;

use serde_json::Value;

use crate::store::{StoreError, StoreTx};

/// One accepted input, ready for the ingest pipeline.
pub struct Envelope {
    /// erp | akinon | loymax | listener | …
    pub source: &'static str,
    /// customer.changed, subscription.changed, …
    pub kind: String,
    /// The entity the event is about (e.g. the ERP customer id).
    pub entity: String,
    /// Unique per logical event; a second event with the same key is a duplicate.
    pub dedupe_key: String,
    /// Unix ms the event describes (payload or AMQP `timestamp`), when known.
    pub occurred_at: Option<i64>,
    /// Unix ms subgate received it.
    pub received_at: i64,
    /// The bytes as received.
    pub raw: Vec<u8>,
    /// Transport metadata, stored with the inbox row.
    pub meta: Value,
    /// The decoded payload and how it changes the state.
    pub change: Box<dyn Change>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No payload here: logs must not carry personal data.
        f.debug_struct("Envelope")
            .field("source", &self.source)
            .field("kind", &self.kind)
            .field("dedupe_key", &self.dedupe_key)
            .field("bytes", &self.raw.len())
            .finish()
    }
}

/// What applying a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The state changed.
    Changed,
    /// The state already said this (identical snapshot).
    NoOp,
    /// Older than what the state already holds; recorded, not applied.
    Stale,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Changed => "applied",
            Applied::NoOp => "noop",
            Applied::Stale => "stale",
        }
    }
}

/// Why applying a change failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The store failed; the whole batch is retried later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This event can never be applied (it goes to the dead-letter queue / a 4xx answer).
    #[error("{0}")]
    Invalid(String),
}

/// The context a change is applied in.
#[derive(Debug, Clone, Copy)]
pub struct ApplyContext {
    /// The inbox row that holds this event.
    pub inbox_id: i64,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
}

/// A decoded payload that knows how to project itself. Implementations live next to their
/// source's decoder; the ingest pipeline only sees this trait.
pub trait Change: Send + Sync + 'static {
    /// Apply to the state inside the ingest transaction. Must be idempotent: applying the same
    /// change twice leaves the state as applying it once.
    fn apply(&self, tx: &mut dyn StoreTx, ctx: &ApplyContext) -> Result<Applied, ApplyError>;

    /// Snapshots are applied by change detection, so a snapshot whose dedupe key was seen before
    /// is still applied when it changes the state (A → B → A ends at A).
    fn is_snapshot(&self) -> bool {
        false
    }

    /// The records, as `(kind, key)`, that `apply` will read or write, when known before it
    /// runs. The ingest pipeline hands a batch's keys to [`StoreTx::prefetch_records`], which may
    /// lock and read them all at once (PostgreSQL: two statements per batch instead of two per
    /// event). Only a hint: a key left out is locked and read when the projection asks for it,
    /// one listed but not touched only costs a lock. Empty (the default): unknown.
    fn record_keys(&self) -> Vec<(&str, &str)> {
        Vec::new()
    }

    /// What this change tells the delivery destinations: the event's `data` and, when it is
    /// about a person, a contact view (`docs/delivery.md`) built from the *stored* state (read
    /// through `tx`, after `apply`), never from a copy the event embeds. Asked only after `apply`
    /// returned [`Applied::Changed`], inside the same savepoint; `None` (the default) delivers
    /// nothing.
    fn outbound(
        &self,
        _tx: &mut dyn StoreTx,
    ) -> Result<Option<crate::delivery::event::Outbound>, StoreError> {
        Ok(None)
    }
}
