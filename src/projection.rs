//! Projection building blocks shared by every source.

use serde_json::Value;

use crate::{
    envelope::{Applied, ApplyContext},
    store::{hash_bytes, RecordRow, StoreError, StoreTx},
};

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
    // Serialised once: the hash and the stored row come from the same bytes, and the current
    // record's document is never parsed (only its hash is compared).
    let doc_json = serde_json::to_string(doc)
        .map_err(|e| StoreError::Failed(format!("cannot serialise a snapshot: {e}")))?;
    let hash = hash_bytes(doc_json.as_bytes());
    let mut row = RecordRow {
        kind,
        key,
        doc_json: &doc_json,
        hash: &hash,
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
    if current.hash == hash {
        tx.touch_record(kind, key, ctx.received_at, ctx.inbox_id, occurred_at)?;
        return Ok(Applied::NoOp);
    }
    row.occurred_at = occurred_at;
    row.version = current.version + 1;
    tx.put_record_row(&row)?;
    Ok(Applied::Changed)
}
