//! Retention of the outbox: delivered and superseded rows, with their attempts and payloads, are
//! deleted `delivery.retention` after they finished, so the outbox holds what is still to do
//! (pending, dead) and a recent past, not every delivery ever made. Dead rows are never purged.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the purge runs.
const EVERY: Duration = Duration::from_secs(60);
/// Rows per transaction: short write transactions, so ingest never waits long behind one.
pub const CHUNK: usize = 2_000;

/// Purge everything due now, a chunk per transaction; returns how many rows went.
pub fn purge_due(store: &dyn Store, retention: Duration, now_ms: i64) -> Result<usize, String> {
    let before = now_ms.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let mut total = 0;
    loop {
        let n = store
            .purge_finished(before, CHUNK)
            .map_err(|e| e.to_string())?;
        total += n;
        if n < CHUNK {
            return Ok(total);
        }
    }
}

/// Once a minute until `stop`, when retention is on.
pub async fn run(store: Arc<dyn Store>, retention: Duration, stop: CancellationToken) {
    loop {
        let store = store.clone();
        let purged = tokio::task::spawn_blocking(move || {
            purge_due(store.as_ref(), retention, crate::clock::now_ms())
        })
        .await;
        match purged {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                metrics::counter!("subgate_outbox_purged_total").increment(n as u64);
                tracing::debug!(rows = n, "purged finished outbox rows");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "outbox retention purge failed"),
            Err(e) => tracing::warn!(error = %e, "outbox retention task failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
