//! Nothing lost, nothing applied twice: 10,000-message streams interrupted by the broker, by
//! `kill -9` and by SIGTERM.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use amqprs::BasicProperties;
use serde_json::json;
use subgate::store::Store;

use crate::{
    erp::ErpQueues,
    helpers::{
        broker_connection_pids, close_broker_connection, eventually, query, spawn_app, temp_dir,
        test_settings, unique, Broker,
    },
};

const MESSAGES: usize = 10_000;

fn stream(prefix: &str, with_message_ids: bool) -> Vec<(Vec<u8>, BasicProperties)> {
    (0..MESSAGES)
        .map(|i| {
            let body = json!({
                "id": format!("{prefix}{i}"),
                "status": if i % 7 == 0 { "Passive" } else { "Active" },
                "name": format!("Müşteri {i} Çağlar Şahin"),
                "contactMedium": [{ "characteristic": {
                    "city": "İSTANBUL(Anadolu)", "country": "Türkiye",
                    "phoneNumber": format!("53{i:08}"), "street1": "içerenköy" } }]
            })
            .to_string()
            .into_bytes();
            let mut props = BasicProperties::default();
            if with_message_ids {
                props.with_message_id(&format!("{prefix}-msg-{i}"));
            }
            (body, props)
        })
        .collect()
}

async fn erp_events(store: std::sync::Arc<dyn Store>) -> (i64, i64) {
    query(store, |s| {
        let stats = s.inbox_stats(Some("erp")).expect("stats");
        (stats.events, stats.distinct_dedupe_keys)
    })
    .await
}

/// Every message of the stream is in the store exactly once: one inbox event each, one
/// record each, at version 1.
async fn assert_exactly_once(store: std::sync::Arc<dyn Store>, prefix: &str) {
    let (events, distinct) = erp_events(store.clone()).await;
    assert_eq!(events, MESSAGES as i64, "one inbox event per message");
    assert_eq!(distinct, MESSAGES as i64);
    let prefix = prefix.to_owned();
    let versions = query(store, move |s| {
        (0..MESSAGES)
            .map(|i| {
                s.get_record("erp.customer", &format!("{prefix}{i}"))
                    .expect("read")
                    .map(|r| r.version)
            })
            .collect::<Vec<_>>()
    })
    .await;
    let missing = versions.iter().filter(|v| v.is_none()).count();
    let reapplied = versions.iter().filter(|v| **v > Some(1)).count();
    assert_eq!(
        (missing, reapplied),
        (0, 0),
        "none lost, none applied twice"
    );
}

#[tokio::test]
async fn broker_closing_the_connection_five_times_mid_stream_loses_and_duplicates_nothing() {
    let queues = ErpQueues::new();
    let name = unique("conn");
    // The stream is held to at most 500 messages a second: 20 unacknowledged messages at a time
    // (the prefetch) and at least one 40 ms batch wait per commit, so 10,000 messages take 20 s
    // or more, and the five closes (one `rabbitmqctl` call each, a second or two, more on a
    // loaded machine) land mid-stream with a wide margin.
    let app = spawn_app(&queues.overrides(&[
        ("amqp.connection_name", name.as_str()),
        ("amqp.prefetch", "20"),
        ("ingest.batch_wait_ms", "40"),
        ("amqp.reconnect_initial_ms", "50"),
        ("amqp.reconnect_max_ms", "500"),
    ]))
    .await;
    app.wait_ready().await;
    let broker = Broker::connect().await;
    let store = app.store();
    let mut published = false;
    for round in 1..=5i64 {
        // The connection's broker pid is looked up before (the first round) or between closes,
        // so only the close itself runs while messages flow.
        let lookup = name.clone();
        let pids = eventually(30, "the gateway's broker connection listed", || {
            let lookup = lookup.clone();
            async move {
                let pids = tokio::task::spawn_blocking(move || broker_connection_pids(&lookup))
                    .await
                    .ok()?;
                (pids.len() == 1).then_some(pids)
            }
        })
        .await;
        if !published {
            broker
                .publish_all(&queues.customers, stream("c", false))
                .await;
            published = true;
        }
        eventually(60, "progress before the next close", || async {
            (erp_events(store.clone()).await.0 > round * 1_000).then_some(())
        })
        .await;
        let pid = pids[0].clone();
        let closed = tokio::task::spawn_blocking(move || close_broker_connection(&pid))
            .await
            .unwrap();
        assert!(closed, "the broker closed the connection (round {round})");
        let (events_at_close, _) = erp_events(store.clone()).await;
        assert!(
            events_at_close < MESSAGES as i64,
            "close {round} happened mid-stream"
        );
    }

    eventually(120, "the whole stream", || async {
        (erp_events(store.clone()).await.0 >= MESSAGES as i64
            && broker.message_count(&queues.customers).await == 0)
            .then_some(())
    })
    .await;
    app.stop().await.unwrap();
    assert_exactly_once(store, "c").await;
    assert_eq!(broker.message_count(&queues.customers).await, 0);
    assert_eq!(
        broker
            .message_count(&format!("{}.dead", queues.customers))
            .await,
        0,
        "nothing dead-lettered"
    );
    broker.delete_queues(&queues.all()).await;
}

/// `subgate serve` as a separate process.
pub struct Subgate {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Subgate {
    pub fn start(dir: &Path, overrides: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_subgate"));
        cmd.arg("serve")
            .env("SUBGATE__HTTP__ADDR", format!("127.0.0.1:{port}"))
            .env(
                "SUBGATE__STORE__URL",
                format!("sqlite://{}", dir.join("subgate.db").display()),
            )
            .env("SUBGATE__LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in overrides {
            cmd.env(
                format!("SUBGATE__{}", k.replace('.', "__").to_ascii_uppercase()),
                v,
            );
        }
        let child = cmd.spawn().expect("subgate binary starts");
        Subgate {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn wait_ready(&self) {
        // reqwest's rustls needs the process-wide provider (no app is built in this process).
        subgate::http::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.base);
        eventually(30, "subgate process ready", || async {
            let r = client.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (up to `secs`) for a clean exit: in-flight work drained.
    pub async fn stop(&mut self, secs: u64) {
        self.sigterm();
        let status = self.wait_exit(secs).await;
        assert!(status.success(), "subgate exited with {status}");
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "subgate did not exit"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Subgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store_at(dir: &Path, overrides: &[(&str, &str)]) -> std::sync::Arc<dyn Store> {
    subgate::startup::open_store(&test_settings(dir, overrides), true).expect("store")
}

#[tokio::test]
async fn kill_9_five_times_while_draining_a_backlog_loses_and_duplicates_nothing() {
    let queues = ErpQueues::new();
    let dir = temp_dir("kill9");
    // At most 100 unacknowledged messages and a 20 ms batch wait per commit hold the stream to
    // 5,000 messages a second or less, so each kill lands mid-stream however fast the machine.
    let overrides = queues.overrides(&[("amqp.prefetch", "100"), ("ingest.batch_wait_ms", "20")]);
    let mut gateway = Subgate::start(&dir, &overrides);
    gateway.wait_ready().await;
    let broker = Broker::connect().await;
    broker
        .publish_all(&queues.customers, stream("k", false))
        .await;

    let store = store_at(&dir, &overrides);
    for round in 1..=5i64 {
        eventually(60, "progress before the next kill", || async {
            (erp_events(store.clone()).await.0 > round * 1_200).then_some(())
        })
        .await;
        gateway.kill_9();
        let (at_kill, _) = erp_events(store.clone()).await;
        assert!(
            at_kill < MESSAGES as i64,
            "kill {round} landed mid-stream ({at_kill})"
        );
        gateway = Subgate::start(&dir, &overrides);
        gateway.wait_ready().await;
    }
    let second = gateway;
    eventually(120, "the whole stream after restart", || async {
        (erp_events(store.clone()).await.0 >= MESSAGES as i64
            && broker.message_count(&queues.customers).await == 0)
            .then_some(())
    })
    .await;
    drop(second);
    assert_exactly_once(store, "k").await;
    assert_eq!(
        broker
            .message_count(&format!("{}.dead", queues.customers))
            .await,
        0,
        "nothing dead-lettered"
    );
    // The database the killed process was writing reads back whole from another connection.
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("subgate.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    )
    .expect("the database subgate wrote");
    let (check, events): (String, i64) = conn
        .query_row(
            "SELECT (SELECT integrity_check FROM pragma_integrity_check), count(*) FROM inbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((check.as_str(), events), ("ok", MESSAGES as i64));
    broker.delete_queues(&queues.all()).await;
}

#[tokio::test]
async fn sigterm_mid_stream_exits_0_and_leaves_nothing_committed_unacked() {
    let queues = ErpQueues::new();
    let dir = temp_dir("sigterm");
    // Held to 5,000 messages a second or less, as in the kill -9 test.
    let overrides = queues.overrides(&[("amqp.prefetch", "100"), ("ingest.batch_wait_ms", "20")]);
    let mut first = Subgate::start(&dir, &overrides);
    first.wait_ready().await;
    let broker = Broker::connect().await;
    broker
        .publish_all(&queues.customers, stream("t", true))
        .await;

    let store = store_at(&dir, &overrides);
    eventually(60, "a part of the stream committed", || async {
        (erp_events(store.clone()).await.0 > 1000).then_some(())
    })
    .await;
    first.sigterm();
    let status = first.wait_exit(30).await;
    assert!(status.success(), "exit status {status:?}");

    // Committed + still queued == published: a committed message left unacked would be back in
    // the queue and counted twice.
    let (committed, _) = erp_events(store.clone()).await;
    let queued = broker.message_count(&queues.customers).await as i64;
    assert!(
        committed < MESSAGES as i64,
        "stopped mid-stream ({committed})"
    );
    assert_eq!(
        committed + queued,
        MESSAGES as i64,
        "committed {committed}, queued {queued}"
    );

    // The rest is consumed after a restart, exactly once.
    let second = Subgate::start(&dir, &overrides);
    second.wait_ready().await;
    eventually(120, "the rest of the stream", || async {
        (erp_events(store.clone()).await.0 >= MESSAGES as i64
            && broker.message_count(&queues.customers).await == 0)
            .then_some(())
    })
    .await;
    drop(second);
    assert_exactly_once(store, "t").await;
    broker.delete_queues(&queues.all()).await;
}

/// Rows in transaction `txn` of the crash writer, ~1 KB each. Every transaction spills SQLite's
/// page cache (16 MB: ~3,870 pages) to the WAL before its commit, and rewrites at the commit a
/// page it had spilled (its marker row, first written and updated last), so SQLite rewrites
/// frame headers already in the WAL. Two of three stay under the 4,096 WAL frames past which the
/// writer checkpoints (and so syncs the WAL) before `write` returns: at `synchronous = normal`
/// nothing but the commit's own writes stands between the acknowledgement and the kill.
fn crash_rows(txn: usize) -> usize {
    if txn % 3 == 2 {
        20_000
    } else {
        11_500
    }
}

const CRASH_WRITER: &str = "SUBGATE_TEST_CRASH_WRITER";

/// The child process of the `sqlite_kill_9_during_cache_spilling_commits_…` tests (this test
/// binary run again, this test alone): through `SqliteStore::write`, transaction N writes
/// `crash_rows(N)` new records and a marker record, N counting from `SUBGATE_TEST_CRASH_FIRST`;
/// it prints `acked N` once the commit has returned, and goes on until killed. Does nothing
/// without its environment.
#[test]
#[ignore = "the child process of the sqlite_kill_9 crash tests; runs only when they start it"]
fn sqlite_crash_writer() {
    let Ok(path) = std::env::var(CRASH_WRITER) else {
        return;
    };
    let synchronous = match std::env::var("SUBGATE_TEST_CRASH_SYNC").as_deref() {
        Ok("normal") => subgate::config::SqliteSynchronous::Normal,
        _ => subgate::config::SqliteSynchronous::Full,
    };
    let first: usize = std::env::var("SUBGATE_TEST_CRASH_FIRST")
        .expect("first transaction number")
        .parse()
        .expect("a number");
    let store = subgate::store::sqlite::SqliteStore::open(Path::new(&path), synchronous)
        .expect("the store opens");
    store.migrate().expect("migrations");
    let filler = "x".repeat(1_000);
    // Bounded in case the parent never kills it.
    for txn in first..first + 200 {
        store
            .write(&mut |tx| {
                let rows = crash_rows(txn);
                let marker = |rows: usize, version: i64| subgate::store::Record {
                    kind: "crash.txn".into(),
                    key: format!("{txn:06}"),
                    doc: json!({ "rows": rows }),
                    hash: format!("{rows:064x}"),
                    occurred_at: None,
                    changed_at: txn as i64,
                    changed_by: txn as i64,
                    seen_at: txn as i64,
                    seen_by: txn as i64,
                    version,
                };
                tx.put_record(&marker(0, 1))?;
                for i in 0..rows {
                    let key = format!("{txn:06}-{i:05}");
                    tx.put_record(&subgate::store::Record {
                        kind: "crash".into(),
                        doc: json!({ "key": key, "filler": filler }),
                        key,
                        hash: format!("{txn:064x}"),
                        occurred_at: None,
                        changed_at: txn as i64,
                        changed_by: txn as i64,
                        seen_at: txn as i64,
                        seen_by: txn as i64,
                        version: 1,
                    })?;
                }
                tx.put_record(&marker(rows, 2))?;
                Ok(())
            })
            .expect("the transaction commits");
        println!("acked {txn}");
    }
}

/// `kill -9` five times, each at a random point, a process that commits cache-spilling
/// transactions; then the database opens again with every acknowledged transaction whole
/// (each transaction all there or not at all) and passes `PRAGMA integrity_check`.
fn kill_9_during_cache_spilling_commits(synchronous: &str) {
    let dir = temp_dir(&format!("crash-{synchronous}"));
    let path = dir.join("crash.db");
    let mut acked: Vec<usize> = vec![];
    for round in 0..5usize {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "resilience::sqlite_crash_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_WRITER, &path)
            .env("SUBGATE_TEST_CRASH_SYNC", synchronous)
            .env("SUBGATE_TEST_CRASH_FIRST", (round * 1_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the crash writer starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The first is on libtest's `test … ` line.
                if let Some((_, n)) = line.rsplit_once("acked ") {
                    let _ = tx.send(n.trim().parse().expect("a transaction number"));
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {round}: no transaction acknowledged ({e})"));
        acked.push(first);
        // Anywhere in the next one or two transactions: building one, spilling, committing,
        // checkpointing, or between two.
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..=1_500)));
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        reader.join().expect("the reader thread");
        acked.extend(rx.try_iter());
        assert!(
            status.code().is_none(),
            "round {round}: the writer exited by itself ({status:?})"
        );
    }
    assert!(acked.len() >= 5, "{acked:?}");

    // Restart: the store opens (SQLite recovers the WAL), then a plain connection counts.
    let store = subgate::store::sqlite::SqliteStore::open(
        &path,
        match synchronous {
            "normal" => subgate::config::SqliteSynchronous::Normal,
            _ => subgate::config::SqliteSynchronous::Full,
        },
    )
    .expect("the store opens after the kills");
    store.migrate().expect("migrations");
    let last = format!("{:06}", acked[acked.len() - 1]);
    assert!(
        store
            .get_record("crash.txn", &last)
            .expect("read")
            .is_some(),
        "the last acknowledged transaction's marker ({last}) reads back"
    );
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("the database");
    let counts: std::collections::BTreeMap<usize, usize> = conn
        .prepare("SELECT substr(key, 1, 6), count(*) FROM records WHERE kind = 'crash' GROUP BY 1")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?.parse::<usize>().unwrap(),
                r.get::<_, usize>(1)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let lost: Vec<(usize, usize)> = acked
        .iter()
        .map(|t| (*t, counts.get(t).copied().unwrap_or(0)))
        .filter(|(t, n)| *n != crash_rows(*t))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged transactions not whole (transaction, rows): {lost:?}; acknowledged {acked:?}"
    );
    let partial: Vec<_> = counts
        .iter()
        .filter(|(t, n)| **n != crash_rows(**t))
        .collect();
    assert!(partial.is_empty(), "transactions in part: {partial:?}");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sqlite_kill_9_during_cache_spilling_commits_loses_nothing_acknowledged_at_synchronous_full() {
    kill_9_during_cache_spilling_commits("full");
}

#[test]
fn sqlite_kill_9_during_cache_spilling_commits_loses_nothing_acknowledged_at_synchronous_normal() {
    kill_9_during_cache_spilling_commits("normal");
}
