//! One conformance suite for every store backend: each behaviour runs against SQLite and
//! against the PostgreSQL server on this machine, each test in its own database.

use std::sync::Arc;

use serde_json::json;
use subgate::{
    consent::{record_consent, Channel, ConsentChange, ConsentState, Normaliser},
    envelope::{Applied, ApplyContext},
    projection::apply_snapshot,
    store::{
        AttemptRecord, AttemptResult, ClaimRequest, DeliveryFilter, DeliveryState, HistoryEntry,
        InboxEntry, InboxInsert, NewOutboxRow, ReplayRequest, Store, StoreError,
    },
};

use crate::helpers::{temp_dir, test_settings, unique};

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh PostgreSQL database on the local server; returns its URL.
pub fn fresh_postgres_database() -> String {
    let name = unique("db").replace('-', "_");
    let mut admin = postgres::Client::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        postgres::NoTls,
    )
    .expect("PostgreSQL on 127.0.0.1:5432 (trust)");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// A migrated store of the given backend, plus its URL (for a second handle).
pub fn fresh_store(backend: Backend) -> (Arc<dyn Store>, String) {
    let url = match backend {
        Backend::Sqlite => format!(
            "sqlite://{}",
            temp_dir("conformance").join("s.db").display()
        ),
        Backend::Postgres => fresh_postgres_database(),
    };
    (open(&url), url)
}

fn open(url: &str) -> Arc<dyn Store> {
    let dir = temp_dir("unused");
    let settings = test_settings(&dir, &[("store.url", url)]);
    subgate::startup::open_store(&settings, true).expect("store opens and migrates")
}

fn ctx(inbox_id: i64, occurred_at: Option<i64>) -> ApplyContext {
    ApplyContext {
        inbox_id,
        occurred_at,
        received_at: 1_000 + inbox_id,
    }
}

fn entry<'a>(key: &'a str, raw: &'a [u8], meta: &'a str) -> InboxEntry<'a> {
    InboxEntry {
        source: "test",
        kind: "thing.changed",
        entity: "e1",
        dedupe_key: key,
        occurred_at: Some(5),
        received_at: 6,
        meta,
        raw,
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Backend::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$name(super::Backend::Postgres)
            }
        }
    )*};
}

on_both_backends!(
    inbox_dedupes_by_key_and_keeps_the_raw_bytes,
    snapshots_apply_by_change_detection_and_never_go_back_in_time,
    links_are_replaced_and_queried_both_ways,
    history_range_is_half_open_and_ordered,
    a_failed_event_rolls_back_to_its_savepoint_and_the_batch_commits,
    concurrent_migrations_apply_each_version_once,
    concurrent_read_modify_writes_of_one_record_lose_no_update,
    concurrent_snapshots_of_one_record_lose_no_version,
    consent_ledger_records_changes_and_ignores_stale_ones,
    outbox_rows_are_claimed_then_delivered_retried_or_dead_and_dead_rows_replay,
    an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_record,
    a_later_row_of_an_entity_waits_for_every_earlier_pending_one,
    claiming_snapshots_coalesces_them_into_the_latest,
    two_store_handles_claiming_concurrently_never_share_a_row_and_keep_entity_order,
);

fn inbox_dedupes_by_key_and_keeps_the_raw_bytes(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let meta_value = json!({"transport": "test"});
    let meta = meta_value.to_string();
    let raw = "{\"ad\":\"Çağlar\"}\u{0}\u{ff}".as_bytes().to_vec();
    let mut outcomes = vec![];
    store
        .write(&mut |tx| {
            outcomes.push(tx.insert_inbox(&entry("k1", &raw, &meta))?);
            outcomes.push(tx.insert_inbox(&entry("k1", b"other", &meta))?);
            outcomes.push(tx.insert_inbox(&entry("k2", b"x", &meta))?);
            Ok(())
        })
        .unwrap();
    let InboxInsert::New(first) = outcomes[0] else {
        panic!("first insert is new: {outcomes:?}")
    };
    assert_eq!(outcomes[1], InboxInsert::Duplicate(first));
    assert!(matches!(outcomes[2], InboxInsert::New(id) if id != first));
    let event = store.inbox_event(first).unwrap().expect("stored");
    assert_eq!(event.raw, raw);
    assert_eq!(event.meta, meta_value);
    assert_eq!(event.outcome, "applied");
    let stats = store.inbox_stats(Some("test")).unwrap();
    assert_eq!((stats.events, stats.distinct_dedupe_keys), (2, 2));
    assert_eq!(store.inbox_stats(Some("nope")).unwrap().events, 0);
}

fn snapshots_apply_by_change_detection_and_never_go_back_in_time(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let mut applied = vec![];
    let a = json!({"name": "A"});
    let b = json!({"name": "B"});
    store
        .write(&mut |tx| {
            applied.push(apply_snapshot(tx, "k", "1", &a, &ctx(1, Some(100)))?);
            applied.push(apply_snapshot(tx, "k", "1", &a, &ctx(2, Some(100)))?);
            applied.push(apply_snapshot(tx, "k", "1", &b, &ctx(3, Some(200)))?);
            applied.push(apply_snapshot(tx, "k", "1", &a, &ctx(4, Some(150)))?);
            applied.push(apply_snapshot(tx, "k", "1", &a, &ctx(5, None))?);
            Ok(())
        })
        .unwrap();
    use Applied::*;
    assert_eq!(applied, vec![Changed, NoOp, Changed, Stale, Changed]);
    let r = store.get_record("k", "1").unwrap().expect("record");
    assert_eq!(r.doc, a);
    assert_eq!(r.version, 3);
    assert_eq!((r.changed_by, r.seen_by), (5, 5));
    assert_eq!(r.occurred_at, Some(200));
    assert!(store.get_record("k", "2").unwrap().is_none());
}

fn links_are_replaced_and_queried_both_ways(backend: Backend) {
    let (store, _) = fresh_store(backend);
    store
        .write(&mut |tx| {
            tx.replace_links("sub.party", "s1", &["c1".into(), "c2".into()])?;
            tx.replace_links("sub.party", "s2", &["c1".into()])?;
            tx.replace_links("sub.party", "s1", &["c2".into(), "c3".into()])?;
            Ok(())
        })
        .unwrap();
    assert_eq!(
        store.links_from("sub.party", "s1").unwrap(),
        vec!["c2", "c3"]
    );
    assert_eq!(store.links_to("sub.party", "c1").unwrap(), vec!["s2"]);
    assert_eq!(store.links_to("sub.party", "c2").unwrap(), vec!["s1"]);
    assert!(store.links_to("other", "c1").unwrap().is_empty());
}

fn history_range_is_half_open_and_ordered(backend: Backend) {
    let (store, _) = fresh_store(backend);
    store
        .write(&mut |tx| {
            for (i, at) in [30, 10, 20, 40].into_iter().enumerate() {
                tx.append_history(&HistoryEntry {
                    kind: "h".into(),
                    key: format!("k{}", i % 2),
                    at,
                    inbox_id: i as i64,
                    doc: json!({ "at": at }),
                })?;
            }
            Ok(())
        })
        .unwrap();
    let ats = |v: Vec<HistoryEntry>| v.into_iter().map(|h| h.at).collect::<Vec<_>>();
    assert_eq!(
        ats(store.history_between("h", 10, 40, 100).unwrap()),
        vec![10, 20, 30]
    );
    assert_eq!(
        ats(store.history_between("h", 10, 40, 2).unwrap()),
        vec![10, 20]
    );
    // Per key, in insertion order.
    assert_eq!(ats(store.history("h", "k0", 100).unwrap()), vec![30, 20]);
}

fn a_failed_event_rolls_back_to_its_savepoint_and_the_batch_commits(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let meta = json!({}).to_string();
    store
        .write(&mut |tx| {
            tx.savepoint()?;
            tx.insert_inbox(&entry("kept", b"1", &meta))?;
            tx.release_savepoint()?;

            tx.savepoint()?;
            tx.insert_inbox(&entry("dropped", b"2", &meta))?;
            // A statement that fails on PostgreSQL (NUL is not valid UTF-8 text there), which
            // aborts its transaction until the rollback to the savepoint...
            let failed = tx.append_history(&HistoryEntry {
                kind: "h".into(),
                key: "\u{0}".into(),
                at: 1,
                inbox_id: 1,
                doc: json!(null),
            });
            // ...SQLite accepts it; either way the event is rolled back deliberately.
            let _ = failed;
            tx.rollback_to_savepoint().expect("rollback to savepoint");

            tx.savepoint().expect("savepoint");
            tx.insert_inbox(&entry("also-kept", b"3", &meta))
                .expect("insert after rollback");
            tx.release_savepoint()?;
            Ok(())
        })
        .unwrap();
    let stats = store.inbox_stats(Some("test")).unwrap();
    assert_eq!(stats.events, 2);
    assert!(store.history_between("h", 0, 10, 10).unwrap().is_empty());
}

fn concurrent_migrations_apply_each_version_once(backend: Backend) {
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", temp_dir("migrate").join("m.db").display()),
        Backend::Postgres => fresh_postgres_database(),
    };
    let applied: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let url = url.clone();
                s.spawn(move || {
                    let dir = temp_dir("unused");
                    let settings = test_settings(&dir, &[("store.url", url.as_str())]);
                    let store = subgate::store::open(&settings).expect("opens");
                    store.migrate().expect("migrates")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        applied.iter().sum::<usize>(),
        applied.iter().copied().max().unwrap()
    );
    assert!(applied.iter().copied().max().unwrap() >= 1);
    assert_eq!(open(&url).migrate().unwrap(), 0);
}

fn concurrent_read_modify_writes_of_one_record_lose_no_update(backend: Backend) {
    let (_, url) = fresh_store(backend);
    // Two independent store handles (two instances), each incrementing one counter.
    const EACH: i64 = 150;
    std::thread::scope(|s| {
        for worker in 0..2 {
            let url = url.clone();
            s.spawn(move || {
                let store = open(&url);
                for i in 0..EACH {
                    loop {
                        let result = store.write(&mut |tx| {
                            let current = tx.get_record("counter", "c")?;
                            let n = current
                                .as_ref()
                                .and_then(|r| r.doc["n"].as_i64())
                                .unwrap_or(0);
                            apply_snapshot(
                                tx,
                                "counter",
                                "c",
                                &json!({ "n": n + 1 }),
                                &ctx(worker * 1000 + i, None),
                            )?;
                            Ok(())
                        });
                        match result {
                            Ok(()) => break,
                            Err(StoreError::Conflict(_)) | Err(StoreError::Unavailable(_)) => {
                                continue
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let r = open(&url)
        .get_record("counter", "c")
        .unwrap()
        .expect("counter");
    assert_eq!(r.doc["n"], 2 * EACH);
    assert_eq!(r.version, 2 * EACH);
}

/// `apply_snapshot` alone (no `get_record` first) is a read-modify-write too: the version it
/// writes is the one it read plus one. Two instances applying distinct snapshots of one record
/// must serialise, so the final version counts every change.
fn concurrent_snapshots_of_one_record_lose_no_version(backend: Backend) {
    let (_, url) = fresh_store(backend);
    const EACH: i64 = 150;
    let changed: i64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let url = url.clone();
                s.spawn(move || {
                    let store = open(&url);
                    let mut changed = 0;
                    for i in 0..EACH {
                        let doc = json!({ "worker": worker, "i": i });
                        loop {
                            let mut applied = None;
                            let result = store.write(&mut |tx| {
                                applied = Some(apply_snapshot(
                                    tx,
                                    "snap",
                                    "s",
                                    &doc,
                                    &ctx(worker * 1000 + i, None),
                                )?);
                                Ok(())
                            });
                            match result {
                                Ok(()) => {
                                    assert_eq!(applied, Some(Applied::Changed));
                                    changed += 1;
                                    break;
                                }
                                Err(StoreError::Conflict(_)) | Err(StoreError::Unavailable(_)) => {
                                    continue
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    changed
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(changed, 2 * EACH);
    let r = open(&url).get_record("snap", "s").unwrap().expect("record");
    assert_eq!(r.version, 2 * EACH);
}

fn consent_ledger_records_changes_and_ignores_stale_ones(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let n = Normaliser::new("TR").unwrap();
    let a1 = n.address(Channel::Sms, "05351234567").unwrap();
    let a2 = n.address(Channel::Sms, "+90 535 123 45 67").unwrap();
    let mut applied = vec![];
    store
        .write(&mut |tx| {
            let change = |a, state, at| ConsentChange {
                address: a,
                state,
                at,
                source: "test",
            };
            applied.push(record_consent(
                tx,
                &change(&a1, ConsentState::OptedIn, 100),
                &ctx(1, None),
            )?);
            applied.push(record_consent(
                tx,
                &change(&a2, ConsentState::OptedOut, 200),
                &ctx(2, None),
            )?);
            applied.push(record_consent(
                tx,
                &change(&a1, ConsentState::OptedIn, 150),
                &ctx(3, None),
            )?);
            applied.push(record_consent(
                tx,
                &change(&a2, ConsentState::OptedOut, 300),
                &ctx(4, None),
            )?);
            Ok(())
        })
        .unwrap();
    use Applied::*;
    assert_eq!(applied, vec![Changed, Changed, Stale, NoOp]);
    let current = store
        .get_record("consent", "sms:+905351234567")
        .unwrap()
        .unwrap();
    assert_eq!(current.doc["state"], "opted_out");
    assert_eq!(current.doc["as_sent"], "+90 535 123 45 67");
    let changes = store
        .history("consent.change", "sms:+905351234567", 10)
        .unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1].doc["previous"], "opted_in");
}

/// Queue outbox rows in one ingest transaction: (destination, entity, payload, coalesce).
fn queue(store: &Arc<dyn Store>, rows: &[(&str, &str, &str, bool)]) -> Vec<i64> {
    let mut ids = vec![];
    store
        .write(&mut |tx| {
            ids.clear();
            for (i, (destination, entity, payload, coalesce)) in rows.iter().enumerate() {
                ids.push(tx.insert_outbox(&NewOutboxRow {
                    destination,
                    source: "test",
                    kind: "thing.changed",
                    entity,
                    inbox_id: i as i64 + 1,
                    payload,
                    coalesce: *coalesce,
                    schedule: "0,1000",
                    created_at: 1_000,
                })?);
            }
            Ok(())
        })
        .unwrap();
    ids
}

fn claim(destination: &str, owner: &str, now: i64, limit: usize) -> ClaimRequest {
    ClaimRequest {
        destination: destination.into(),
        owner: owner.into(),
        now,
        lease_until: now + 1_000,
        limit,
        coalesce: false,
    }
}

fn attempt(outbox_id: i64, attempt: i64, result: AttemptResult) -> AttemptRecord {
    AttemptRecord {
        outbox_id,
        attempt,
        started_at: 2_000,
        latency_ms: 5,
        result,
        status: Some(match result {
            AttemptResult::Delivered => 200,
            AttemptResult::Retry { .. } => 503,
            AttemptResult::Dead => 400,
        }),
        error: None,
        response: Some("body".into()),
    }
}

fn ids(rows: &[subgate::store::OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

fn outbox_rows_are_claimed_then_delivered_retried_or_dead_and_dead_rows_replay(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let event = r#"{"id":"evt_1","data":{"ad":"Çağlar"}}"#;
    let queued = queue(
        &store,
        &[
            ("crm", "test:a", event, false),
            ("audit", "test:a", event, false),
            ("crm", "test:b", "{\"id\":\"evt_2\"}", false),
            ("crm", "test:c", "{\"id\":\"evt_3\"}", false),
        ],
    );
    let [a, audit, b, c] = queued[..] else {
        panic!("four ids: {queued:?}")
    };
    assert_eq!(store.delivery(audit).unwrap().unwrap().payload, event);

    assert!(
        store
            .claim_deliveries(&claim("crm", "w1", 999, 10))
            .unwrap()
            .is_empty(),
        "nothing is due before it was created"
    );
    let claimed = store
        .claim_deliveries(&claim("crm", "w1", 2_000, 10))
        .unwrap();
    assert_eq!(
        ids(&claimed),
        [a, b, c],
        "oldest first, one destination only"
    );
    assert_eq!(
        claimed[0].payload, event,
        "the payload comes with the claim"
    );
    assert_eq!(claimed[0].locked_until, Some(3_000));
    assert!(
        store
            .claim_deliveries(&claim("crm", "w2", 2_500, 10))
            .unwrap()
            .is_empty(),
        "leased rows are not claimed again"
    );

    store
        .record_attempts(
            "crm",
            "w1",
            &[
                attempt(a, 1, AttemptResult::Delivered),
                attempt(
                    b,
                    1,
                    AttemptResult::Retry {
                        next_attempt_at: 5_000,
                    },
                ),
                attempt(c, 1, AttemptResult::Dead),
            ],
        )
        .unwrap();
    let row_a = store.delivery(a).unwrap().unwrap();
    assert_eq!(
        (
            row_a.state,
            row_a.attempts,
            row_a.finished_at,
            row_a.locked_until
        ),
        (DeliveryState::Delivered, 1, Some(2_005), None)
    );
    let row_b = store.delivery(b).unwrap().unwrap();
    assert_eq!(
        (
            row_b.state,
            row_b.next_attempt_at,
            row_b.last_status,
            row_b.locked_until
        ),
        (DeliveryState::Pending, 5_000, Some(503), None)
    );
    let row_c = store.delivery(c).unwrap().unwrap();
    assert_eq!(
        (row_c.state, row_c.last_response.as_deref()),
        (DeliveryState::Dead, Some("body"))
    );
    let tries = store.delivery_attempts(b).unwrap();
    assert_eq!(tries.len(), 1);
    assert_eq!(
        (
            tries[0].outcome.as_str(),
            tries[0].status,
            tries[0].next_attempt_at
        ),
        ("retry", Some(503), Some(5_000))
    );
    let stats = store.delivery_stats("crm").unwrap();
    assert_eq!(
        (stats.pending, stats.oldest_pending_at, stats.dead),
        (1, Some(1_000), 1)
    );

    assert!(store
        .claim_deliveries(&claim("crm", "w1", 4_999, 10))
        .unwrap()
        .is_empty());
    // record_then_claim: the retry is due, and the next claim sees the recorded state.
    let again = store
        .record_then_claim(&[], &claim("crm", "w1", 5_000, 10))
        .unwrap();
    assert_eq!(ids(&again), [b]);
    let none = store
        .record_then_claim(
            &[attempt(b, 2, AttemptResult::Delivered)],
            &claim("crm", "w1", 5_000, 10),
        )
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(
        store.delivery(b).unwrap().unwrap().state,
        DeliveryState::Delivered
    );

    let dead = store
        .list_deliveries(&DeliveryFilter {
            state: Some(DeliveryState::Dead),
            destination: Some("crm".into()),
            limit: 10,
            ..DeliveryFilter::default()
        })
        .unwrap();
    assert_eq!(ids(&dead), [c]);
    let all = store
        .list_deliveries(&DeliveryFilter {
            after_id: Some(a),
            limit: 2,
            ..DeliveryFilter::default()
        })
        .unwrap();
    assert_eq!(ids(&all), [audit, b], "paged by id");
    let replay = store
        .replay_dead(&ReplayRequest {
            destination: Some("crm".into()),
            since: None,
            actor: "cli".into(),
            now: 6_000,
        })
        .unwrap();
    assert_eq!(replay.rows, 1);
    let revived = store.delivery(c).unwrap().unwrap();
    assert_eq!(
        (
            revived.state,
            revived.attempts,
            revived.replays,
            revived.next_attempt_at
        ),
        (DeliveryState::Pending, 0, 1, 6_000)
    );
    assert_eq!(
        ids(&store
            .claim_deliveries(&claim("crm", "w1", 6_000, 10))
            .unwrap()),
        [c]
    );
    assert_eq!(store.release_leases("w1").unwrap(), 1);
    assert_eq!(store.delivery(c).unwrap().unwrap().locked_until, None);
}

fn an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_record(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let [id] = queue(&store, &[("crm", "test:a", "{}", false)])[..] else {
        panic!("one id")
    };
    assert_eq!(
        ids(&store
            .claim_deliveries(&claim("crm", "dead-worker", 2_000, 10))
            .unwrap()),
        [id]
    );
    assert!(store
        .claim_deliveries(&claim("crm", "w2", 2_999, 10))
        .unwrap()
        .is_empty());
    let taken = store
        .claim_deliveries(&claim("crm", "w2", 3_000, 10))
        .unwrap();
    assert_eq!(ids(&taken), [id], "taken over once the lease expired");
    assert_eq!(taken[0].locked_until, Some(4_000));

    store
        .record_attempts("crm", "dead-worker", &[attempt(id, 1, AttemptResult::Dead)])
        .unwrap();
    let row = store.delivery(id).unwrap().unwrap();
    assert_eq!(
        (row.state, row.locked_until),
        (DeliveryState::Pending, Some(4_000)),
        "a lost lease records nothing on the row"
    );
    assert_eq!(
        store.delivery_attempts(id).unwrap().len(),
        1,
        "the attempt is kept"
    );
    store
        .record_attempts("crm", "w2", &[attempt(id, 1, AttemptResult::Delivered)])
        .unwrap();
    assert_eq!(
        store.delivery(id).unwrap().unwrap().state,
        DeliveryState::Delivered
    );
    assert_eq!(store.release_leases("w2").unwrap(), 0);
}

fn a_later_row_of_an_entity_waits_for_every_earlier_pending_one(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let queued = queue(
        &store,
        &[
            ("crm", "test:a", "{}", false),
            ("crm", "test:a", "{}", false),
            ("crm", "test:b", "{}", false),
            ("other", "test:a", "{}", false),
        ],
    );
    let [a1, a2, b1, other] = queued[..] else {
        panic!("four ids")
    };
    let first = store
        .claim_deliveries(&claim("crm", "w1", 2_000, 10))
        .unwrap();
    assert_eq!(ids(&first), [a1, b1], "a2 waits for a1");
    assert_eq!(
        ids(&store
            .claim_deliveries(&claim("other", "w3", 2_000, 10))
            .unwrap()),
        [other],
        "the key is per destination"
    );
    // A leased earlier row holds the later one back for every other claimer too.
    assert!(store
        .claim_deliveries(&claim("crm", "w2", 2_000, 10))
        .unwrap()
        .is_empty());
    store
        .record_attempts(
            "crm",
            "w1",
            &[
                attempt(
                    a1,
                    1,
                    AttemptResult::Retry {
                        next_attempt_at: 2_500,
                    },
                ),
                attempt(b1, 1, AttemptResult::Delivered),
            ],
        )
        .unwrap();
    assert!(
        store
            .claim_deliveries(&claim("crm", "w2", 2_100, 10))
            .unwrap()
            .is_empty(),
        "a retried earlier row still holds the later one back"
    );
    assert_eq!(
        ids(&store
            .claim_deliveries(&claim("crm", "w2", 2_500, 10))
            .unwrap()),
        [a1]
    );
    store
        .record_attempts("crm", "w2", &[attempt(a1, 2, AttemptResult::Dead)])
        .unwrap();
    assert_eq!(
        ids(&store
            .claim_deliveries(&claim("crm", "w2", 2_500, 10))
            .unwrap()),
        [a2],
        "a dead row no longer holds its key"
    );
}

fn claiming_snapshots_coalesces_them_into_the_latest(backend: Backend) {
    let (store, _) = fresh_store(backend);
    let queued = queue(
        &store,
        &[
            ("emarsys", "test:a", "{\"v\":1}", true),
            ("emarsys", "test:a", "{\"v\":2}", true),
            ("emarsys", "test:a", "{\"v\":3}", true),
            ("emarsys", "test:a", "{\"v\":4}", false),
        ],
    );
    let [s1, s2, s3, event] = queued[..] else {
        panic!("four ids")
    };
    let mut request = claim("emarsys", "w1", 2_000, 10);
    request.coalesce = true;
    let claimed = store.claim_deliveries(&request).unwrap();
    assert_eq!(
        ids(&claimed),
        [s3],
        "the latest snapshot goes in place of the first"
    );
    assert_eq!(claimed[0].payload, "{\"v\":3}");
    assert_eq!(claimed[0].locked_until, Some(3_000));
    for id in [s1, s2] {
        let row = store.delivery(id).unwrap().unwrap();
        assert_eq!(
            (row.state, row.superseded_by),
            (DeliveryState::Superseded, Some(s3))
        );
    }
    assert_eq!(
        store.delivery(event).unwrap().unwrap().state,
        DeliveryState::Pending
    );
    store
        .record_attempts("emarsys", "w1", &[attempt(s3, 1, AttemptResult::Delivered)])
        .unwrap();
    assert_eq!(ids(&store.claim_deliveries(&request).unwrap()), [event]);
}

fn two_store_handles_claiming_concurrently_never_share_a_row_and_keep_entity_order(
    backend: Backend,
) {
    let (store, url) = fresh_store(backend);
    const ENTITIES: usize = 10;
    const PER_ENTITY: usize = 20;
    let keys: Vec<String> = (0..ENTITIES).map(|e| format!("test:e{e}")).collect();
    let rows: Vec<(&str, &str, &str, bool)> = (0..PER_ENTITY)
        .flat_map(|_| keys.iter().map(|k| ("crm", k.as_str(), "{}", false)))
        .collect();
    let queued = queue(&store, &rows);
    // What each "instance" sent, in the order sent (between its claim and its record).
    let sent = std::sync::Mutex::new(Vec::<(String, i64, usize)>::new());
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for worker in 0..2usize {
            let url = url.clone();
            let (sent, start) = (&sent, &start);
            s.spawn(move || {
                let store = open(&url);
                start.wait();
                let owner = format!("instance-{worker}");
                let mut idle = 0;
                while idle < 20 {
                    let rows = loop {
                        match store.claim_deliveries(&claim("crm", &owner, 2_000, 3)) {
                            Ok(rows) => break rows,
                            Err(e) if e.is_transient() => continue,
                            Err(e) => panic!("{e}"),
                        }
                    };
                    if rows.is_empty() {
                        idle += 1;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    }
                    idle = 0;
                    let mut done = vec![];
                    for row in &rows {
                        sent.lock()
                            .unwrap()
                            .push((row.entity.clone(), row.id, worker));
                        done.push(attempt(row.id, 1, AttemptResult::Delivered));
                    }
                    // The call to the provider.
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    loop {
                        match store.record_attempts("crm", &owner, &done) {
                            Ok(()) => break,
                            Err(e) if e.is_transient() => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let sent = sent.into_inner().unwrap();
    let mut sent_ids: Vec<i64> = sent.iter().map(|(_, id, _)| *id).collect();
    sent_ids.sort_unstable();
    assert_eq!(sent_ids, queued, "every row sent exactly once");
    for key in &keys {
        let order: Vec<i64> = sent
            .iter()
            .filter(|(k, ..)| k == key)
            .map(|(_, id, _)| *id)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "{key} went out in commit order");
    }
    let by = |w| sent.iter().filter(|(.., who)| *who == w).count();
    assert!(
        by(0) > 0 && by(1) > 0,
        "both handles took part ({}, {})",
        by(0),
        by(1)
    );
    let stats = store.delivery_stats("crm").unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 0));
}

/// A steady stream of commits never leaves the background checkpointer a moment to catch up
/// with the last frame, and SQLite only rewinds the WAL when a write starts with everything
/// checkpointed: the writer has to finish the checkpoint itself, or the WAL grows as long as the
/// load lasts (it reached 400 MB in `scripts/bench-amqp --messages 200000`).
#[test]
fn sqlite_wal_stays_bounded_under_a_steady_stream_of_commits() {
    let dir = temp_dir("wal");
    let path = dir.join("s.db");
    let store = open(&format!("sqlite://{}", path.display()));
    let raw = vec![b'x'; 2_000];
    let mut n = 0u64;
    // ~60 MB of raw payloads, in 300 back-to-back transactions of 100 events.
    for _ in 0..300 {
        store
            .write(&mut |tx| {
                for _ in 0..100 {
                    n += 1;
                    tx.insert_inbox(&entry(&format!("k{n}"), &raw, "{}"))?;
                }
                Ok(())
            })
            .unwrap();
    }
    let wal = std::fs::metadata(dir.join("s.db-wal")).unwrap().len();
    assert!(
        wal < 40_000_000,
        "the WAL grew to {wal} bytes for 60 MB written"
    );
    assert_eq!(store.inbox_stats(Some("test")).unwrap().events, 30_000);
}
