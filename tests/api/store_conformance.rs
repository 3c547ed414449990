//! One conformance suite for every store backend: each behaviour runs against SQLite and
//! against the PostgreSQL server on this machine, each test in its own database.

use std::sync::Arc;

use serde_json::json;
use subgate::{
    consent::{record_consent, Channel, ConsentChange, ConsentState, Normaliser},
    envelope::{Applied, ApplyContext},
    projection::apply_snapshot,
    store::{HistoryEntry, InboxEntry, InboxInsert, Store, StoreError},
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
    consent_ledger_records_changes_and_ignores_stale_ones,
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
            applied.push(apply_snapshot(tx, "k", "1", a.clone(), &ctx(1, Some(100)))?);
            applied.push(apply_snapshot(tx, "k", "1", a.clone(), &ctx(2, Some(100)))?);
            applied.push(apply_snapshot(tx, "k", "1", b.clone(), &ctx(3, Some(200)))?);
            applied.push(apply_snapshot(tx, "k", "1", a.clone(), &ctx(4, Some(150)))?);
            applied.push(apply_snapshot(tx, "k", "1", a.clone(), &ctx(5, None))?);
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
                                json!({ "n": n + 1 }),
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
