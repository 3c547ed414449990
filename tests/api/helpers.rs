//! Test harness: spawn the real application in-process on a random port with its own SQLite
//! file and its own queue names, against the real RabbitMQ on this machine.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use amqprs::{
    channel::{
        BasicGetArguments, BasicPublishArguments, Channel, QueueDeclareArguments,
        QueueDeleteArguments, QueuePurgeArguments,
    },
    connection::{Connection, OpenConnectionArguments},
    BasicProperties, FieldTable,
};
use subgate::{
    config::{ConfigSource, Settings},
    startup::Application,
    store::{
        AttemptRecord, AttemptRow, ClaimRequest, DeliveryFilter, HistoryEntry, InboxEvent,
        InboxStats, OutboxRow, Record, Store, StoreError, StoreTx,
    },
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A unique name for queues, files, … (tests run in parallel, and leftovers of earlier runs
/// must not interfere).
pub fn unique(prefix: &str) -> String {
    format!(
        "test-{prefix}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// The test process that made a [`unique`] name (`…-{pid}-{8 hex digits}`, or with `_` for
/// database names), if the name is one.
pub fn maker_of(name: &str, separator: char) -> Option<u32> {
    let mut parts = name.rsplitn(3, separator);
    let suffix = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    (suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit())).then_some(pid)
}

/// Whether an earlier test process that made a [`unique`] name is gone (its leftovers can go).
pub fn maker_is_gone(pid: u32) -> bool {
    pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove the temporary directories of test processes that are gone (every run used to leave
/// ~200 of them, SQLite files included, and a crashed run leaves all); `temp_dir` does it once
/// per test process.
pub fn sweep_temp_dirs_of_gone_tests() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("test-") && maker_of(name, '-').is_some_and(maker_is_gone) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn temp_dir(prefix: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_temp_dirs_of_gone_tests);
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Settings for a test app: port 0, its own database, ERP consumers off unless the test
/// turns them on; `overrides` are `SUBGATE__…`-style (`"erp.enabled"`, `"true"`).
pub fn test_settings(dir: &std::path::Path, overrides: &[(&str, &str)]) -> Settings {
    let mut env = vec![
        ("SUBGATE__HTTP__ADDR".to_string(), "127.0.0.1:0".to_string()),
        (
            "SUBGATE__STORE__URL".to_string(),
            format!("sqlite://{}", dir.join("subgate.db").display()),
        ),
        ("SUBGATE__ERP__ENABLED".to_string(), "false".to_string()),
        (
            "SUBGATE__AMQP__RECONNECT_INITIAL_MS".to_string(),
            "100".to_string(),
        ),
        (
            "SUBGATE__AMQP__RECONNECT_MAX_MS".to_string(),
            "1000".to_string(),
        ),
        ("SUBGATE__SHUTDOWN__TIMEOUT".to_string(), "20s".to_string()),
    ];
    for (key, value) in overrides {
        env.push((
            format!("SUBGATE__{}", key.replace('.', "__").to_ascii_uppercase()),
            value.to_string(),
        ));
    }
    Settings::load(&ConfigSource { file: None, env }).expect("test settings are valid")
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub dir: PathBuf,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app(overrides: &[(&str, &str)]) -> TestApp {
    let dir = temp_dir("app");
    spawn_app_in(dir, overrides).await
}

pub async fn spawn_app_in(dir: PathBuf, overrides: &[(&str, &str)]) -> TestApp {
    let settings = test_settings(&dir, overrides);
    let app = Application::build(settings.clone())
        .await
        .expect("application builds");
    run_app(app, settings, dir)
}

/// Run a built application in the background.
pub fn run_app(app: Application, settings: Settings, dir: PathBuf) -> TestApp {
    let addr = app.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        addr,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        settings,
        dir,
        shutdown,
        handle,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Wait until `/readyz` answers 200 (consumers connected).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "app not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("GET succeeds");
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// The Prometheus page.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// A separate handle on the same database, to assert on rows directly.
    pub fn store(&self) -> std::sync::Arc<dyn Store> {
        let settings = self.settings.clone();
        // A blocking client (PostgreSQL) must not be created on an async worker.
        std::thread::spawn(move || subgate::store::open(&settings).expect("store opens"))
            .join()
            .expect("store thread")
    }

    /// Graceful stop; returns what `run_until_stopped` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await.expect("app task joins")
    }
}

/// Poll `f` until it returns `Some`, or panic after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A publisher/inspector on the real broker.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
}

impl Broker {
    pub async fn connect() -> Self {
        let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
        let connection = Connection::open(&args)
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = connection.open_channel(None).await.expect("channel");
        channel.tx_select().await.expect("tx.select");
        Broker {
            connection,
            channel,
        }
    }

    /// Publish persistent messages to the default exchange (queue by name), committed in one
    /// transaction, with optional properties per message.
    pub async fn publish_all(&self, queue: &str, messages: Vec<(Vec<u8>, BasicProperties)>) {
        for chunk in messages.chunks(1000) {
            for (body, props) in chunk {
                let mut props = props.clone();
                props.with_persistence(true);
                self.channel
                    .basic_publish(props, body.clone(), BasicPublishArguments::new("", queue))
                    .await
                    .expect("publish");
            }
            self.channel.tx_commit().await.expect("tx.commit");
        }
    }

    pub async fn publish(&self, queue: &str, body: &[u8]) {
        self.publish_all(queue, vec![(body.to_vec(), BasicProperties::default())])
            .await;
    }

    pub async fn publish_with(&self, queue: &str, body: &[u8], props: BasicProperties) {
        self.publish_all(queue, vec![(body.to_vec(), props)]).await;
    }

    /// Ready messages in a queue (passive declare).
    pub async fn message_count(&self, queue: &str) -> u32 {
        let ch = self.connection.open_channel(None).await.expect("channel");
        let (_, count, _) = ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .expect("queue exists")
            .expect("declare-ok");
        let _ = ch.close().await;
        count
    }

    /// Take one message (auto-ack) with its properties.
    pub async fn get(&self, queue: &str) -> Option<(BasicProperties, Vec<u8>)> {
        let ch = self.connection.open_channel(None).await.expect("channel");
        let got = ch
            .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
            .await
            .expect("basic.get");
        let _ = ch.close().await;
        got.map(|(_, props, body)| (props, body))
    }

    pub async fn delete_queues(&self, queues: &[String]) {
        let ch = self.connection.open_channel(None).await.expect("channel");
        for q in queues {
            let _ = ch.queue_purge(QueuePurgeArguments::new(q)).await;
            let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
        }
        let _ = ch.close().await;
    }
}

/// The value of a string header.
pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let table: &FieldTable = props.headers()?;
    table
        .as_ref()
        .iter()
        .find(|(k, _)| k.as_ref() as &str == name)
        .map(|(_, v)| match v {
            amqprs::FieldValue::S(s) => s.to_string(),
            other => format!("{other:?}"),
        })
}

/// Close, from the broker side, every AMQP connection whose `connection_name` is `name`
/// (blocking: runs `rabbitmqctl`). Returns how many were closed.
pub fn close_broker_connections(name: &str) -> usize {
    broker_connection_pids(name)
        .iter()
        .filter(|pid| close_broker_connection(pid))
        .count()
}

/// The broker's process ids of the connections whose client-provided name is `name`.
pub fn broker_connection_pids(name: &str) -> Vec<String> {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&listing.stdout);
    let needle = format!("\"{name}\"");
    text.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Close one broker connection by its process id; true when the broker closed it.
pub fn close_broker_connection(pid: &str) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(["close_connection", pid, "closed by test"])
        .status()
        .expect("rabbitmqctl runs")
        .success()
}

/// Spawn the app around a given store (for fault injection).
pub async fn spawn_app_with_store(
    dir: PathBuf,
    overrides: &[(&str, &str)],
    store: std::sync::Arc<dyn Store>,
) -> TestApp {
    let settings = test_settings(&dir, overrides);
    let app = Application::build_with_store(settings.clone(), store)
        .await
        .expect("application builds");
    run_app(app, settings, dir)
}

/// Run a blocking store query from a test.
pub async fn query<T: Send + 'static>(
    store: std::sync::Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> T + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .expect("query task")
}

/// A store that passes everything to `inner`, with faults and hooks a test switches on.
pub struct HookedStore {
    inner: Arc<dyn Store>,
    after_first_commit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    fail_next_record_then_claim: AtomicBool,
}

impl HookedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            after_first_commit: Mutex::new(None),
            fail_next_record_then_claim: AtomicBool::new(false),
        }
    }

    /// Run `hook` once, right after the first successful commit.
    pub fn after_first_commit(self, hook: impl FnOnce() + Send + 'static) -> Self {
        *self.after_first_commit.lock().unwrap() = Some(Box::new(hook));
        self
    }

    /// Fail the first `record_then_claim` that carries answers (a dropped connection, say).
    pub fn failing_one_record_then_claim(self) -> Self {
        self.fail_next_record_then_claim
            .store(true, Ordering::SeqCst);
        self
    }

    /// Whether the `record_then_claim` failure has happened.
    pub fn record_then_claim_failed(&self) -> bool {
        !self.fail_next_record_then_claim.load(Ordering::SeqCst)
    }
}

impl Store for HookedStore {
    fn migrate(&self) -> Result<usize, StoreError> {
        self.inner.migrate()
    }
    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn StoreTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let result = self.inner.write(f);
        if result.is_ok() {
            if let Some(hook) = self.after_first_commit.lock().unwrap().take() {
                hook();
            }
        }
        result
    }
    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get_record(kind, key)
    }
    fn links_to(&self, kind: &str, to: &str) -> Result<Vec<String>, StoreError> {
        self.inner.links_to(kind, to)
    }
    fn links_from(&self, kind: &str, from: &str) -> Result<Vec<String>, StoreError> {
        self.inner.links_from(kind, from)
    }
    fn history(
        &self,
        kind: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.inner.history(kind, key, limit)
    }
    fn history_between(
        &self,
        kind: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.inner.history_between(kind, from, to, limit)
    }
    fn inbox_event(&self, id: i64) -> Result<Option<InboxEvent>, StoreError> {
        self.inner.inbox_event(id)
    }
    fn inbox_stats(&self, source: Option<&str>) -> Result<InboxStats, StoreError> {
        self.inner.inbox_stats(source)
    }
    fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping()
    }
    fn claim_deliveries(&self, claim: &ClaimRequest) -> Result<Vec<OutboxRow>, StoreError> {
        self.inner.claim_deliveries(claim)
    }
    fn record_attempts(
        &self,
        destination: &str,
        owner: &str,
        attempts: &[AttemptRecord],
    ) -> Result<(), StoreError> {
        self.inner.record_attempts(destination, owner, attempts)
    }
    fn record_then_claim(
        &self,
        attempts: &[AttemptRecord],
        claim: &ClaimRequest,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        if !attempts.is_empty()
            && self
                .fail_next_record_then_claim
                .swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable("connection reset".into()));
        }
        self.inner.record_then_claim(attempts, claim)
    }
    fn release_leases(&self, destination: &str, owner: &str) -> Result<usize, StoreError> {
        self.inner.release_leases(destination, owner)
    }
    fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<OutboxRow>, StoreError> {
        self.inner.list_deliveries(filter)
    }
    fn delivery(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        self.inner.delivery(id)
    }
    fn delivery_attempts(&self, outbox_id: i64) -> Result<Vec<AttemptRow>, StoreError> {
        self.inner.delivery_attempts(outbox_id)
    }
}

#[test]
fn temp_dirs_of_gone_test_processes_are_swept_and_live_ones_kept() {
    assert_eq!(
        maker_of("test-pg-instances-24186-c77ece59", '-'),
        Some(24186)
    );
    assert_eq!(maker_of("test_db_24186_c77ece59", '_'), Some(24186));
    assert_eq!(maker_of("test-notes", '-'), None);
    assert_eq!(maker_of("test-x-12-notahex!", '-'), None);
    // pid_max is at most 2^22: no process has this id.
    let gone = std::env::temp_dir().join(format!(
        "test-sweep-{}-{:08x}",
        4_194_400,
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::write(gone.join("s.db"), b"x").unwrap();
    let live = temp_dir("sweep");
    sweep_temp_dirs_of_gone_tests();
    assert!(!gone.exists(), "a gone process's directory is removed");
    assert!(live.exists(), "this process's directory stays");
}
