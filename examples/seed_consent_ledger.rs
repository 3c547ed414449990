//! Fill a store's consent ledger with N changes through the real ledger code (`record_consent`),
//! for `scripts/bench-http`. Usage: `seed_consent_ledger DB_PATH CHANGES DAYS END_UNIX_MS`.
//!
//! Addresses: CHANGES / 5 of them, a third each email, sms and call; every change flips the
//! address's state; times are spread evenly over DAYS ending at END_UNIX_MS; half the changes
//! come from a provider ("emarsys"), half from Akinon.

use std::{path::Path, process::ExitCode};

use serde_json::json;
use subgate::{
    config::SqliteSynchronous,
    consent::{record_consent, Channel, ConsentChange, ConsentState, Normaliser},
    envelope::ApplyContext,
    store::{sqlite::SqliteStore, InboxEntry, InboxInsert, Store, StoreError},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (|| -> Option<(String, u64, u64, i64)> {
        Some((
            args.get(1)?.clone(),
            args.get(2)?.parse().ok()?,
            args.get(3)?.parse().ok()?,
            args.get(4)?.parse().ok()?,
        ))
    })();
    let Some((db, changes, days, end)) = parsed else {
        eprintln!("usage: seed_consent_ledger DB_PATH CHANGES DAYS END_UNIX_MS");
        return ExitCode::from(2);
    };
    match seed(Path::new(&db), changes, days, end) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn seed(db: &Path, changes: u64, days: u64, end: i64) -> Result<(), StoreError> {
    let store = SqliteStore::open(db, SqliteSynchronous::Normal)?;
    store.migrate()?;
    let normaliser = Normaliser::new("TR").map_err(StoreError::Failed)?;
    let span_ms = (days * 86_400_000) as i64;
    let start = end - span_ms;
    let addresses = (changes / 5).max(1);
    let meta = json!({ "transport": "seed" }).to_string();
    let batch = 20_000u64;
    let mut i = 0u64;
    while i < changes {
        let upto = (i + batch).min(changes);
        store.write(&mut |tx| {
            for n in i..upto {
                let a = n % addresses;
                let (channel, raw) = match a % 3 {
                    0 => (Channel::Email, format!("seed{a}@example.com")),
                    1 => (Channel::Sms, format!("0535{:07}", a % 10_000_000)),
                    _ => (Channel::Call, format!("0536{:07}", a % 10_000_000)),
                };
                let address = normaliser
                    .address(channel, &raw)
                    .map_err(StoreError::Failed)?;
                let at = start + (n as i128 * span_ms as i128 / changes as i128) as i64;
                let key = format!("seed:{n}");
                let InboxInsert::New(inbox_id) = tx.insert_inbox(&InboxEntry {
                    source: "seed",
                    kind: "consent.seed",
                    entity: &raw,
                    dedupe_key: &key,
                    occurred_at: Some(at),
                    received_at: at,
                    meta: &meta,
                    raw: b"{}",
                })?
                else {
                    continue;
                };
                // Round r of this address: opted out on even rounds, in on odd ones.
                let round = n / addresses;
                let state = if round % 2 == 0 {
                    ConsentState::OptedOut
                } else {
                    ConsentState::OptedIn
                };
                let source = if n % 2 == 0 { "emarsys" } else { "akinon" };
                record_consent(
                    tx,
                    &ConsentChange {
                        address: &address,
                        state,
                        at,
                        source,
                    },
                    &ApplyContext {
                        inbox_id,
                        occurred_at: Some(at),
                        received_at: at,
                    },
                )?;
            }
            Ok(())
        })?;
        i = upto;
    }
    let stats = store.inbox_stats(Some("seed"))?;
    println!("seeded {} consent changes over {days} days", stats.events);
    Ok(())
}
