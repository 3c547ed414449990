//! The ingest pipeline: one writer, group commit.
//!
//! Sources hand envelopes to [`Ingest::enqueue`]; a dedicated writer thread takes them in
//! arrival order, up to `ingest.batch_max` at a time (waiting at most `ingest.batch_wait_ms` for a
//! batch to fill), and writes each batch in ONE transaction: inbox insert → dedupe → projection
//! → one outbox row per destination whose filter matches a real change.
//! Each caller learns its event's outcome only after that transaction has committed, which is
//! when an AMQP delivery may be acked or an HTTP call answered.
//!
//! A transient store failure (disk full, I/O error, locked, PostgreSQL unreachable, a lost race
//! retried too often) costs only time: the writer marks the store not ready with the reason,
//! tries each HTTP event once and answers it 503 if the store still cannot write, keeps the AMQP
//! events ([`Ingest::enqueue_held`]) and writes them again with backoff until the store takes
//! them. Their deliveries stay unacked meanwhile, so prefetch stops the broker and no
//! redelivery counts against a delivery limit.

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::IngestSettings,
    delivery::routes::OutboxRoutes,
    envelope::{Applied, ApplyContext, ApplyError, Envelope},
    health::Health,
    store::{InboxEntry, InboxInsert, Store, StoreError, StoreTx},
};

/// What HTTP sources put in `Retry-After` when the store cannot write (seconds).
pub const RETRY_AFTER_SECS: u32 = 5;

/// What happened to one event, known after commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The inbox row holding the event (for a duplicate: the first occurrence).
    pub inbox_id: i64,
    pub status: IngestStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestStatus {
    Applied,
    NoOp,
    Stale,
    Duplicate,
}

impl IngestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IngestStatus::Applied => "applied",
            IngestStatus::NoOp => "noop",
            IngestStatus::Stale => "stale",
            IngestStatus::Duplicate => "duplicate",
        }
    }
}

impl From<Applied> for IngestStatus {
    fn from(a: Applied) -> Self {
        match a {
            Applied::Changed => IngestStatus::Applied,
            Applied::NoOp => IngestStatus::NoOp,
            Applied::Stale => IngestStatus::Stale,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Nothing was committed; try again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This event can never be applied; the raw bytes come back for the dead-letter queue.
    #[error("rejected: {reason}")]
    Rejected { reason: String, raw: Vec<u8> },
    /// The pipeline is shut down.
    #[error("ingest pipeline closed")]
    Closed,
}

pub type Reply = oneshot::Receiver<Result<IngestOutcome, IngestError>>;

struct Job {
    envelope: Envelope,
    /// `envelope.meta` serialised by the caller, off the writer thread.
    meta_json: String,
    /// When the event was queued (`subgate_ingest_wait_seconds`).
    queued: Instant,
    /// Through a store outage: kept and written again (AMQP) rather than answered at once.
    hold: bool,
    reply: oneshot::Sender<Result<IngestOutcome, IngestError>>,
}

/// Handle to the pipeline; cheap to clone. The writer stops once every handle is dropped and
/// the events already queued are committed.
#[derive(Clone)]
pub struct Ingest {
    jobs: mpsc::Sender<Job>,
    /// Set by the writer while the store cannot write.
    outage: Arc<std::sync::atomic::AtomicBool>,
}

impl Ingest {
    /// Queue an event (waits while the queue is full: back-pressure). The returned receiver
    /// resolves after the event's batch has committed or failed.
    /// While the store cannot write, it resolves at once with [`IngestError::Unavailable`].
    pub async fn enqueue(&self, envelope: Envelope) -> Result<Reply, IngestError> {
        self.queue(envelope, false).await
    }

    /// Queue an event whose caller can wait (an AMQP delivery, held unacked): through a store
    /// outage it is kept and written again with backoff, so the receiver resolves only once
    /// the event is committed or rejected, or the pipeline shuts down ([`IngestError::Closed`]).
    pub async fn enqueue_held(&self, envelope: Envelope) -> Result<Reply, IngestError> {
        self.queue(envelope, true).await
    }

    /// Whether the writer is waiting out a store outage right now.
    pub fn store_down(&self) -> bool {
        self.outage.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn queue(&self, envelope: Envelope, hold: bool) -> Result<Reply, IngestError> {
        let (reply, rx) = oneshot::channel();
        let meta_json = serde_json::to_string(&envelope.meta).unwrap_or_else(|_| "{}".into());
        self.jobs
            .send(Job {
                envelope,
                meta_json,
                queued: Instant::now(),
                hold,
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(rx)
    }

    /// Queue an event and wait for its committed outcome.
    pub async fn submit(&self, envelope: Envelope) -> Result<IngestOutcome, IngestError> {
        self.enqueue(envelope)
            .await?
            .await
            .unwrap_or(Err(IngestError::Closed))
    }
}

/// The writer thread; join it after dropping every [`Ingest`] handle.
pub struct IngestWriter {
    thread: JoinHandle<()>,
}

impl IngestWriter {
    /// Block until the writer has committed everything queued and stopped.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Start the writer thread (no delivery destinations).
pub fn start(
    store: Arc<dyn Store>,
    settings: &IngestSettings,
    runtime: tokio::runtime::Handle,
) -> (Ingest, IngestWriter) {
    start_with_routes(
        store,
        settings,
        Arc::new(OutboxRoutes::default()),
        Health::default(),
        runtime,
    )
}

/// Start the writer thread; real changes get outbox rows for the matching `routes`. The
/// writer reports whether the store takes writes as the `health` component `store`.
pub fn start_with_routes(
    store: Arc<dyn Store>,
    settings: &IngestSettings,
    routes: Arc<OutboxRoutes>,
    health: Health,
    runtime: tokio::runtime::Handle,
) -> (Ingest, IngestWriter) {
    let (jobs, rx) = mpsc::channel(settings.queue_capacity);
    let batch_max = settings.batch_max;
    let batch_wait = Duration::from_millis(settings.batch_wait_ms);
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outage = Outage::new(
        health,
        down.clone(),
        Duration::from_millis(settings.store_retry_ms.max(1)),
        Duration::from_millis(settings.store_retry_max_ms.max(settings.store_retry_ms)),
    );
    let thread = std::thread::Builder::new()
        .name("subgate-ingest".into())
        .spawn(move || run_writer(store, routes, rx, batch_max, batch_wait, outage, runtime))
        .unwrap_or_else(|e| panic!("cannot spawn the ingest writer thread: {e}"));
    (Ingest { jobs, outage: down }, IngestWriter { thread })
}

/// The writer's view of whether the store takes writes, published to readiness and metrics.
struct Outage {
    health: Health,
    /// Shared with every [`Ingest`] handle.
    down: Arc<std::sync::atomic::AtomicBool>,
    /// When the current outage began; `None`: the store writes.
    since: Option<Instant>,
    /// The pause before the next attempt: doubles from `initial` up to `max`.
    delay: Duration,
    initial: Duration,
    max: Duration,
    /// `disk full: …`, for the answers given meanwhile.
    reason: String,
}

impl Outage {
    fn new(
        health: Health,
        down: Arc<std::sync::atomic::AtomicBool>,
        initial: Duration,
        max: Duration,
    ) -> Self {
        health.set("store", true, "writing");
        metrics::gauge!("subgate_store_writable").set(1.0);
        Self {
            health,
            down,
            since: None,
            delay: initial,
            initial,
            max,
            reason: String::new(),
        }
    }

    fn failed(&mut self, e: &StoreError) {
        let reason = outage_reason(e);
        metrics::counter!("subgate_commit_failures_total", "reason" => reason).increment(1);
        if self.since.is_none() {
            tracing::warn!(error = %e, reason, "the store cannot write: holding AMQP deliveries, answering HTTP with 503, retrying with backoff");
            self.since = Some(Instant::now());
            self.delay = self.initial;
            metrics::gauge!("subgate_store_writable").set(0.0);
            self.down.store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.delay = (self.delay * 2).min(self.max);
        }
        self.reason = format!("{reason}: {}", e.message());
        self.health.set("store", false, self.reason.clone());
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                after_ms = since.elapsed().as_millis() as u64,
                "the store writes again"
            );
            metrics::gauge!("subgate_store_writable").set(1.0);
            self.down.store(false, std::sync::atomic::Ordering::Relaxed);
            self.health.set("store", true, "writing");
        }
    }

    /// The next pause, spread by ±20 % so instances do not retry in step.
    fn pause(&self) -> Duration {
        self.delay.mul_f64(0.8 + fastrand::f64() * 0.4)
    }
}

/// Every value [`outage_reason`] answers (the `subgate_commit_failures_total` labels).
pub const OUTAGE_REASONS: &[&str] = &[
    "conflict",
    "disk full",
    "connection refused",
    "database locked",
    "read-only",
    "I/O error",
    "server restarting",
    "connection lost",
    "unavailable",
];

/// A short name for why the store cannot write: the readiness reason and the metric label.
pub fn outage_reason(e: &StoreError) -> &'static str {
    let text = e.to_string().to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if matches!(e, StoreError::Conflict(_)) {
        "conflict"
    } else if has(&["disk is full", "disk full", "no space left", "53100"]) {
        "disk full"
    } else if has(&["connection refused"]) {
        "connection refused"
    } else if has(&["locked", "busy"]) {
        "database locked"
    } else if has(&["readonly", "read-only", "read only", "25006"]) {
        "read-only"
    } else if has(&["i/o error", "ioerr"]) {
        "I/O error"
    } else if has(&[
        "57p01",
        "57p02",
        "57p03",
        "shutting down",
        "starting up",
        "recovery",
    ]) {
        "server restarting"
    } else if has(&[
        "connection",
        "closed",
        "broken pipe",
        "reset",
        "timed out",
        ": 08", // SQLSTATE class 08 (connection exception), after "store unavailable: "
    ]) {
        "connection lost"
    } else {
        "unavailable"
    }
}

fn run_writer(
    store: Arc<dyn Store>,
    routes: Arc<OutboxRoutes>,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    batch_wait: Duration,
    mut outage: Outage,
    runtime: tokio::runtime::Handle,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(batch_max);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        let deadline = Instant::now() + batch_wait;
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    // The timer must be created inside the runtime, hence the async block.
                    match runtime.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
                        Ok(Some(job)) => batch.push(job),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        match write_batch(store.as_ref(), &routes, &mut batch) {
            Ok(spent) => {
                outage.recovered();
                // Freeing a batch's envelopes (their decoded documents) is about a tenth of the
                // writer's time: a runtime worker does it, beside the next batch.
                if !spent.is_empty() {
                    runtime.spawn(async move { drop(spent) });
                }
            }
            Err(e) => {
                outage.failed(&e);
                let held = answer_unheld(&mut batch, &outage.reason);
                if !ride_out(
                    store.as_ref(),
                    &routes,
                    &mut rx,
                    held,
                    batch_max,
                    &mut outage,
                    &runtime,
                ) {
                    break;
                }
            }
        }
    }
    tracing::debug!("ingest writer stopped");
}

/// Answer the jobs that cannot wait (HTTP) with 503 now; returns the ones held through outages.
fn answer_unheld(batch: &mut Vec<Job>, reason: &str) -> Vec<Job> {
    let mut held = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        if job.hold {
            held.push(job);
        } else {
            let _ = job
                .reply
                .send(Err(IngestError::Unavailable(reason.to_owned())));
        }
    }
    held
}

/// Wait out a store outage: pause with backoff (keeping new held events, in order), then write
/// the held events again, until the store takes them all. An HTTP event cuts the pause short:
/// it is tried at once with the held ones, and answered 503 if the store still cannot write
/// (its caller retries; so a retry right after the store is back succeeds). Without any event,
/// an empty write probes the store. Returns `false` when every handle is gone (shutdown): what
/// is still held is answered [`IngestError::Closed`], its deliveries stay unacked and the
/// broker delivers them again.
fn ride_out(
    store: &dyn Store,
    routes: &OutboxRoutes,
    rx: &mut mpsc::Receiver<Job>,
    mut held: Vec<Job>,
    batch_max: usize,
    outage: &mut Outage,
    runtime: &tokio::runtime::Handle,
) -> bool {
    let mut open = true;
    while outage.since.is_some() {
        let deadline = Instant::now() + outage.pause();
        while open {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match runtime.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
                Ok(Some(job)) => {
                    let now = !job.hold;
                    held.push(job);
                    if now {
                        break;
                    }
                }
                Ok(None) => open = false,
                Err(_) => break,
            }
        }
        if held.is_empty() {
            match store.write(&mut |_| Ok(())) {
                Ok(()) => outage.recovered(),
                Err(e) => outage.failed(&e),
            }
        }
        let mut queue = std::mem::take(&mut held);
        while !queue.is_empty() {
            let take = queue.len().min(batch_max.max(1));
            let mut batch: Vec<Job> = queue.drain(..take).collect();
            match write_batch(store, routes, &mut batch) {
                Ok(spent) => {
                    outage.recovered();
                    runtime.spawn(async move { drop(spent) });
                }
                Err(e) => {
                    outage.failed(&e);
                    batch.append(&mut queue);
                    held = answer_unheld(&mut batch, &outage.reason);
                }
            }
        }
        if !open && outage.since.is_some() {
            for job in held.drain(..) {
                let _ = job.reply.send(Err(IngestError::Closed));
            }
            return false;
        }
    }
    open
}

/// How often a batch that lost a race with another instance is written again.
const CONFLICT_RETRIES: u64 = 5;

/// Per-event result inside the transaction: `Err` rejects only that event.
type EventResult = Result<IngestOutcome, String>;

/// Write one batch and answer its jobs; returns the committed envelopes, for the caller to free.
/// A batch that fails for a reason that is not transient is written again event by event, and an
/// event that fails alone is rejected (its source dead-letters it). Only a transient failure comes
/// back as `Err`: then the jobs not yet answered stay in `batch`, in order.
fn write_batch(
    store: &dyn Store,
    routes: &OutboxRoutes,
    batch: &mut Vec<Job>,
) -> Result<Vec<Envelope>, StoreError> {
    match commit_batch(store, routes, batch) {
        Err(e) if !e.is_transient() => {
            let mut spent = Vec::new();
            let mut rest: std::collections::VecDeque<Job> = batch.drain(..).collect();
            while let Some(job) = rest.pop_front() {
                let mut one = vec![job];
                match commit_batch(store, routes, &mut one) {
                    Ok(done) => spent.extend(done),
                    Err(e) if e.is_transient() => {
                        batch.append(&mut one);
                        batch.extend(rest);
                        return Err(e);
                    }
                    Err(e) => {
                        for job in one {
                            let Job {
                                mut envelope,
                                reply,
                                ..
                            } = job;
                            let raw = std::mem::take(&mut envelope.raw);
                            let _ = reply.send(Err(IngestError::Rejected {
                                reason: format!("cannot be stored: {e}"),
                                raw,
                            }));
                        }
                    }
                }
            }
            Ok(spent)
        }
        other => other,
    }
}

fn commit_batch(
    store: &dyn Store,
    routes: &OutboxRoutes,
    batch: &mut Vec<Job>,
) -> Result<Vec<Envelope>, StoreError> {
    let started = Instant::now();
    let wait = metrics::histogram!("subgate_ingest_wait_seconds");
    for job in batch.iter() {
        wait.record(started.saturating_duration_since(job.queued).as_secs_f64());
    }
    let mut results: Vec<EventResult> = Vec::with_capacity(batch.len());
    let mut attempt = 0;
    let mut isolation = Isolation::Optimistic;
    let written = loop {
        let mut event_failed = false;
        let written = std::panic::catch_unwind(AssertUnwindSafe(|| {
            store.write(&mut |tx| {
                results.clear();
                let again = || {
                    StoreError::Failed(
                        "an event failed: the batch is written again, event by event".into(),
                    )
                };
                // Optimistic: the batch's inbox rows in one go, and its records locked and read
                // in one go; any failure that is not a lost race means "event by event".
                let inserted = match isolation {
                    Isolation::Optimistic => match prepare_batch(tx, batch) {
                        Ok(inserted) => inserted,
                        Err(e) if e.is_transient() => return Err(e),
                        Err(_) => {
                            event_failed = true;
                            return Err(again());
                        }
                    },
                    Isolation::Isolated => Vec::new(),
                };
                for (i, job) in batch.iter().enumerate() {
                    let inserted = inserted.get(i).copied();
                    match ingest_one(tx, routes, job, inserted, isolation)? {
                        Some(result) => results.push(result),
                        None => {
                            event_failed = true;
                            return Err(again());
                        }
                    }
                }
                // What the store held back is written now, while a failure can still send the
                // batch to the event-by-event write.
                match tx.flush() {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_transient() || isolation == Isolation::Isolated => Err(e),
                    Err(_) => {
                        event_failed = true;
                        Err(again())
                    }
                }
            })
        }))
        // A panic is a bug, not an outage: the batch is split until the event that causes it is
        // rejected alone (dead-lettered), so it cannot hold its queue.
        .unwrap_or_else(|_| Err(StoreError::Failed("ingest writer panicked".into())));
        if event_failed && isolation == Isolation::Optimistic {
            isolation = Isolation::Isolated;
            continue;
        }
        // Another instance won a race (deadlock, serialization failure): nothing was
        // committed, so the same batch is simply written again.
        match written {
            Err(StoreError::Conflict(_)) if attempt < CONFLICT_RETRIES => {
                attempt += 1;
                metrics::counter!("subgate_commit_conflicts_total").increment(1);
                std::thread::sleep(Duration::from_millis(fastrand::u64(1..=10 * attempt)));
            }
            other => break other,
        }
    };
    let elapsed = started.elapsed();
    metrics::histogram!("subgate_batch_size").record(batch.len() as f64);
    metrics::histogram!("subgate_commit_seconds").record(elapsed.as_secs_f64());

    match written {
        Ok(()) => {
            let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
            let mut spent = Vec::with_capacity(batch.len());
            for (job, result) in batch.drain(..).zip(results.drain(..)) {
                let Job {
                    mut envelope,
                    reply,
                    ..
                } = job;
                let source = envelope.source;
                let answer = match result {
                    Ok(outcome) => {
                        *counts.entry((source, outcome.status.as_str())).or_default() += 1;
                        Ok(outcome)
                    }
                    Err(reason) => {
                        *counts.entry((source, "rejected")).or_default() += 1;
                        Err(IngestError::Rejected {
                            reason,
                            raw: std::mem::take(&mut envelope.raw),
                        })
                    }
                };
                let _ = reply.send(answer);
                spent.push(envelope);
            }
            for ((source, status), n) in counts {
                metrics::counter!("subgate_committed_total", "source" => source, "status" => status)
                    .increment(n);
            }
            Ok(spent)
        }
        Err(e) => {
            tracing::debug!(error = %e, events = batch.len(), "ingest batch not committed");
            Err(e)
        }
    }
}

/// How a batch is written. Events rarely fail, so a batch is first written `Optimistic`: no
/// savepoints (on PostgreSQL that saves two round trips per event). If any event fails, that
/// transaction is rolled back and the batch is written again `Isolated`: each event in its own
/// savepoint, so only the failing ones are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    Optimistic,
    Isolated,
}

/// The batch-level half of an optimistic write: every event's inbox row in one call, then every
/// record the batch says it will touch locked and read in one call (the inbox first, as event
/// by event: a duplicate of an event another instance is writing waits for it there). Returns
/// each event's inbox answer, in batch order.
fn prepare_batch(tx: &mut dyn StoreTx, batch: &[Job]) -> Result<Vec<InboxInsert>, StoreError> {
    let entries: Vec<InboxEntry<'_>> = batch
        .iter()
        .map(|job| inbox_entry(&job.envelope, &job.meta_json))
        .collect();
    let inserted = tx.insert_inbox_batch(&entries)?;
    if inserted.len() != batch.len() {
        return Err(StoreError::Failed(format!(
            "{} inbox answers for {} events",
            inserted.len(),
            batch.len()
        )));
    }
    let keys: Vec<(&str, &str)> = batch
        .iter()
        .flat_map(|job| job.envelope.change.record_keys())
        .collect();
    if !keys.is_empty() {
        tx.prefetch_records(&keys)?;
    }
    Ok(inserted)
}

/// One event inside the batch transaction: a transient store error aborts the batch (`Err`);
/// any other failure rejects this event only (`Ok(Some(Err(reason)))`) when isolated, or asks
/// for the isolated write (`Ok(None)`) when optimistic. `inserted`: its inbox row, when the
/// batch inserted it already.
fn ingest_one(
    tx: &mut dyn StoreTx,
    routes: &OutboxRoutes,
    job: &Job,
    inserted: Option<InboxInsert>,
    isolation: Isolation,
) -> Result<Option<EventResult>, StoreError> {
    let (env, meta_json) = (&job.envelope, job.meta_json.as_str());
    if isolation == Isolation::Optimistic {
        return match record_event(tx, routes, env, meta_json, inserted) {
            Ok(outcome) => Ok(Some(Ok(outcome))),
            Err(ApplyError::Store(e)) if e.is_transient() => Err(e),
            Err(_) => Ok(None),
        };
    }
    tx.savepoint()?;
    match record_event(tx, routes, env, meta_json, inserted) {
        Ok(outcome) => {
            tx.release_savepoint()?;
            Ok(Some(Ok(outcome)))
        }
        Err(ApplyError::Store(e)) if e.is_transient() => Err(e),
        Err(e) => {
            tx.rollback_to_savepoint()?;
            Ok(Some(Err(e.to_string())))
        }
    }
}

fn inbox_entry<'a>(env: &'a Envelope, meta_json: &'a str) -> InboxEntry<'a> {
    InboxEntry {
        source: env.source,
        kind: &env.kind,
        entity: &env.entity,
        dedupe_key: &env.dedupe_key,
        occurred_at: env.occurred_at,
        received_at: env.received_at,
        meta: meta_json,
        raw: &env.raw,
    }
}

fn record_event(
    tx: &mut dyn StoreTx,
    routes: &OutboxRoutes,
    env: &Envelope,
    meta_json: &str,
    inserted: Option<InboxInsert>,
) -> Result<IngestOutcome, ApplyError> {
    let entry = inbox_entry(env, meta_json);
    let inserted = match inserted {
        Some(inserted) => inserted,
        None => tx.insert_inbox(&entry)?,
    };
    match inserted {
        InboxInsert::New(inbox_id) => {
            let applied = env.change.apply(tx, &context(env, inbox_id))?;
            tx.set_inbox_outcome(inbox_id, applied.as_str())?;
            if applied == Applied::Changed {
                routes.write_outbox(tx, env, inbox_id)?;
            }
            Ok(IngestOutcome {
                inbox_id,
                status: applied.into(),
            })
        }
        InboxInsert::Duplicate(first) if env.change.is_snapshot() => {
            // Same bytes as an earlier snapshot. If the state has moved on since (A → B → A),
            // this is a real change and gets its own inbox row; otherwise it is a duplicate.
            let key = format!(
                "{}#{}-{}",
                env.dedupe_key,
                env.received_at,
                fastrand::u32(..)
            );
            tx.savepoint()?;
            let inbox_id = match tx.insert_inbox(&InboxEntry {
                dedupe_key: &key,
                ..entry
            })? {
                InboxInsert::New(id) => id,
                InboxInsert::Duplicate(_) => {
                    tx.rollback_to_savepoint()?;
                    return Ok(duplicate(first));
                }
            };
            let applied = match env.change.apply(tx, &context(env, inbox_id)) {
                Ok(applied) => applied,
                Err(e) => {
                    // Undo this attempt's savepoint; the caller rolls back the event's own.
                    tx.rollback_to_savepoint()?;
                    return Err(e);
                }
            };
            match applied {
                Applied::Changed => {
                    tx.set_inbox_outcome(inbox_id, Applied::Changed.as_str())?;
                    routes.write_outbox(tx, env, inbox_id)?;
                    tx.release_savepoint()?;
                    Ok(IngestOutcome {
                        inbox_id,
                        status: IngestStatus::Applied,
                    })
                }
                Applied::NoOp | Applied::Stale => {
                    tx.rollback_to_savepoint()?;
                    Ok(duplicate(first))
                }
            }
        }
        InboxInsert::Duplicate(first) => Ok(duplicate(first)),
    }
}

fn duplicate(inbox_id: i64) -> IngestOutcome {
    IngestOutcome {
        inbox_id,
        status: IngestStatus::Duplicate,
    }
}

fn context(env: &Envelope, inbox_id: i64) -> ApplyContext {
    ApplyContext {
        inbox_id,
        occurred_at: env.occurred_at,
        received_at: env.received_at,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        config::SqliteSynchronous,
        envelope::{ApplyContext, Change},
        store::sqlite::SqliteStore,
    };

    /// Writes a record, or fails when asked to.
    struct TestChange {
        key: String,
        fail: bool,
    }

    impl Change for TestChange {
        fn apply(&self, tx: &mut dyn StoreTx, ctx: &ApplyContext) -> Result<Applied, ApplyError> {
            crate::projection::apply_snapshot(tx, "test", &self.key, &json!({"k": self.key}), ctx)?;
            if self.key == "panics" {
                panic!("a bug in a projection");
            }
            if self.fail {
                return Err(ApplyError::Invalid("this event cannot apply".into()));
            }
            Ok(Applied::Changed)
        }
    }

    fn envelope(key: &str, fail: bool) -> Envelope {
        Envelope {
            source: "test",
            kind: "thing.changed".into(),
            entity: key.into(),
            dedupe_key: format!("test:{key}"),
            occurred_at: None,
            received_at: 1,
            raw: key.as_bytes().to_vec(),
            meta: json!({}),
            change: Box::new(TestChange {
                key: key.into(),
                fail,
            }),
        }
    }

    /// A migrated SQLite store in its own directory, and settings whose batch wait is long
    /// enough that a test's three events share one batch.
    fn store_and_settings() -> (Arc<dyn Store>, IngestSettings) {
        let dir = std::env::temp_dir().join(format!("subgate-ingest-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.join("i.db"), SqliteSynchronous::Normal).unwrap());
        store.migrate().unwrap();
        let settings = IngestSettings {
            batch_max: 64,
            batch_wait_ms: 200,
            queue_capacity: 16,
            max_message_bytes: 1024,
            store_retry_ms: 10,
            store_retry_max_ms: 100,
        };
        (store, settings)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_event_is_rejected_alone_and_the_rest_of_its_batch_commits() {
        let (store, settings) = store_and_settings();
        let (ingest, writer) = start(store.clone(), &settings, tokio::runtime::Handle::current());
        let replies = vec![
            ingest.enqueue(envelope("a", false)).await.unwrap(),
            ingest.enqueue(envelope("bad", true)).await.unwrap(),
            ingest.enqueue(envelope("c", false)).await.unwrap(),
        ];
        let mut results = Vec::new();
        for r in replies {
            results.push(r.await.unwrap());
        }
        assert!(matches!(
            results[0],
            Ok(IngestOutcome {
                status: IngestStatus::Applied,
                ..
            })
        ));
        assert!(
            matches!(&results[1], Err(IngestError::Rejected { reason, raw }) if reason.contains("cannot apply") && raw == b"bad")
        );
        assert!(matches!(
            results[2],
            Ok(IngestOutcome {
                status: IngestStatus::Applied,
                ..
            })
        ));
        drop(ingest);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
        // The rejected event left nothing behind: no inbox row, no record.
        assert_eq!(store.inbox_stats(Some("test")).unwrap().events, 2);
        assert!(store.get_record("test", "bad").unwrap().is_none());
        assert!(store.get_record("test", "a").unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_that_panics_is_rejected_alone_and_its_batch_commits_without_it() {
        let (store, settings) = store_and_settings();
        let (ingest, writer) = start(store.clone(), &settings, tokio::runtime::Handle::current());
        let replies = vec![
            ingest.enqueue_held(envelope("a", false)).await.unwrap(),
            ingest
                .enqueue_held(envelope("panics", false))
                .await
                .unwrap(),
            ingest.enqueue_held(envelope("c", false)).await.unwrap(),
        ];
        let mut results = Vec::new();
        for r in replies {
            results.push(r.await.unwrap());
        }
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(
            matches!(&results[1], Err(IngestError::Rejected { reason, raw }) if reason.contains("panicked") && raw == b"panics"),
            "{:?}",
            results[1]
        );
        drop(ingest);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
        assert_eq!(store.inbox_stats(Some("test")).unwrap().events, 2);
        assert!(store.get_record("test", "panics").unwrap().is_none());
    }

    #[test]
    fn outage_reasons_name_the_cause() {
        let cases = [
            (StoreError::Unavailable("database or disk is full".into()), "disk full"),
            (
                StoreError::Unavailable("cannot connect to PostgreSQL at x: error connecting to server: Connection refused (os error 111)".into()),
                "connection refused",
            ),
            (StoreError::Unavailable("database is locked".into()), "database locked"),
            (StoreError::Unavailable("disk I/O error".into()), "I/O error"),
            (StoreError::Unavailable("57P01: terminating connection due to administrator command".into()), "server restarting"),
            (StoreError::Unavailable("connection closed".into()), "connection lost"),
            (StoreError::Conflict("40001: could not serialize access".into()), "conflict"),
        ];
        for (error, reason) in cases {
            assert_eq!(outage_reason(&error), reason, "{error}");
            assert!(OUTAGE_REASONS.contains(&reason), "{reason}");
        }
        assert!(OUTAGE_REASONS.contains(&outage_reason(&StoreError::Unavailable("?".into()))));
        assert!(
            OUTAGE_REASONS.contains(&outage_reason(&StoreError::Unavailable(
                "attempt to write a readonly database".into()
            )))
        );
    }
}
