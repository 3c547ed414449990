//! Projection building blocks shared by every source.

use serde::Serialize;
use serde_json::Value;

use crate::{
    envelope::{Applied, ApplyContext},
    store::{hash_bytes, RecordRow, StoreError, StoreTx},
};

/// A snapshot document serialised once, with the hash of those bytes: the stored row and the
/// change detection both come from it. Sources build it while decoding, off the single writer
/// thread, when they can.
#[derive(Debug, Clone)]
pub struct SnapshotDoc {
    json: String,
    hash: String,
}

impl SnapshotDoc {
    /// Any serialisable document: a `Value` (keys in order), or a typed document straight from
    /// its struct, without building a `Value` first (fields in declaration order; its maps must
    /// be ordered ones, so equal documents serialise to equal bytes).
    pub fn new(doc: &(impl Serialize + ?Sized)) -> Result<Self, StoreError> {
        let json = serde_json::to_string(doc)
            .map_err(|e| StoreError::Failed(format!("cannot serialise a snapshot: {e}")))?;
        let hash = hash_bytes(json.as_bytes());
        Ok(Self { json, hash })
    }
}

/// Apply a snapshot of one entity by change detection:
/// - older than what the record already describes (by `occurred_at`) → `Stale`, untouched;
/// - same content as the record → `NoOp` (only "last seen" moves);
/// - otherwise the document is replaced and the version incremented → `Changed`.
pub fn apply_snapshot(
    tx: &mut dyn StoreTx,
    kind: &str,
    key: &str,
    doc: &Value,
    ctx: &ApplyContext,
) -> Result<Applied, StoreError> {
    apply_snapshot_doc(tx, kind, key, &SnapshotDoc::new(doc)?, ctx)
}

/// [`apply_snapshot`] for a document already serialised. The current record's document is
/// never parsed: only its hash is compared.
pub fn apply_snapshot_doc(
    tx: &mut dyn StoreTx,
    kind: &str,
    key: &str,
    doc: &SnapshotDoc,
    ctx: &ApplyContext,
) -> Result<Applied, StoreError> {
    let hash = &doc.hash;
    let mut row = RecordRow {
        kind,
        key,
        doc_json: &doc.json,
        hash,
        occurred_at: ctx.occurred_at,
        changed_at: ctx.received_at,
        changed_by: ctx.inbox_id,
        seen_at: ctx.received_at,
        seen_by: ctx.inbox_id,
        version: 1,
    };
    let Some(current) = tx.get_record_head(kind, key)? else {
        tx.put_record_row(&row)?;
        return Ok(Applied::Changed);
    };
    if let (Some(new), Some(current)) = (ctx.occurred_at, current.occurred_at) {
        if new < current {
            return Ok(Applied::Stale);
        }
    }
    let occurred_at = current.occurred_at.max(ctx.occurred_at);
    if current.hash == *hash {
        tx.touch_record(kind, key, ctx.received_at, ctx.inbox_id, occurred_at)?;
        return Ok(Applied::NoOp);
    }
    row.occurred_at = occurred_at;
    row.version = current.version + 1;
    tx.put_record_row(&row)?;
    Ok(Applied::Changed)
}
