//! Projection building blocks shared by every source.

use serde_json::Value;

use crate::{
    envelope::{Applied, ApplyContext},
    store::{content_hash, Record, StoreError, StoreTx},
};

/// Apply a snapshot of one entity by change detection:
/// - older than what the record already describes (by `occurred_at`) → `Stale`, untouched;
/// - same content as the record → `NoOp` (only "last seen" moves);
/// - otherwise the document is replaced and the version incremented → `Changed`.
pub fn apply_snapshot(
    tx: &mut dyn StoreTx,
    kind: &str,
    key: &str,
    doc: Value,
    ctx: &ApplyContext,
) -> Result<Applied, StoreError> {
    let hash = content_hash(&doc);
    let Some(mut record) = tx.get_record(kind, key)? else {
        tx.put_record(&Record {
            kind: kind.to_owned(),
            key: key.to_owned(),
            doc,
            hash,
            occurred_at: ctx.occurred_at,
            changed_at: ctx.received_at,
            changed_by: ctx.inbox_id,
            seen_at: ctx.received_at,
            seen_by: ctx.inbox_id,
            version: 1,
        })?;
        return Ok(Applied::Changed);
    };
    if let (Some(new), Some(current)) = (ctx.occurred_at, record.occurred_at) {
        if new < current {
            return Ok(Applied::Stale);
        }
    }
    record.seen_at = ctx.received_at;
    record.seen_by = ctx.inbox_id;
    record.occurred_at = record.occurred_at.max(ctx.occurred_at);
    let applied = if record.hash == hash {
        Applied::NoOp
    } else {
        record.doc = doc;
        record.hash = hash;
        record.changed_at = ctx.received_at;
        record.changed_by = ctx.inbox_id;
        record.version += 1;
        Applied::Changed
    };
    tx.put_record(&record)?;
    Ok(applied)
}
