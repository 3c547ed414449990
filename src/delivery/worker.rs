//! One delivery worker per destination. A step claims due rows with a lease, sends them through
//! the destination's transport, and records every attempt. `run` drains due rows (pipelined:
//! the next batch is claimed and the last one recorded while one is on the wire) until
//! shutdown, then releases the leases it still holds. Tests drive [`Worker::step`] one at a
//! time, or [`Worker::drain`].

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{stream::FuturesUnordered, StreamExt};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    amqp::AmqpTransport,
    emarsys::EmarsysTransport,
    http_client,
    retry::{next_delay, parse_schedule, RetryPolicy, Verdict},
    webhook::{keep_response, parse_secrets, Signer, WebhookTransport},
    Budget,
};
use crate::{
    config::{DestinationKind, DestinationSettings, Settings},
    store::{AttemptRecord, AttemptResult, ClaimRequest, OutboxRow, Store, StoreError},
};

/// How much of a response body an attempt keeps.
pub const KEPT_RESPONSE_BYTES: usize = 2048;

/// What a transport says about one row.
#[derive(Debug, Clone)]
pub struct SendResult {
    pub verdict: Verdict,
    /// Unix ms the attempt started.
    pub started_at: i64,
    pub latency: Duration,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub response: Option<String>,
}

impl SendResult {
    pub fn start() -> i64 {
        crate::clock::now_ms()
    }

    /// A response came back.
    pub fn answered(
        started_at: i64,
        clock: Instant,
        status: u16,
        verdict: Verdict,
        body: String,
    ) -> Self {
        SendResult {
            verdict,
            started_at,
            latency: clock.elapsed(),
            status: Some(status),
            error: (verdict != Verdict::Delivered).then(|| format!("HTTP {status}")),
            response: keep_response(verdict, body),
        }
    }

    /// No response: timeouts and connection errors are retried. The URL is left out of the
    /// message (it may carry credentials).
    pub fn failed(started_at: i64, clock: Instant, e: &reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        Self::retry(started_at, clock, format!("{kind}: {}", error_chain(e)))
    }

    /// Retry, with a reason.
    pub fn retry(started_at: i64, clock: Instant, error: String) -> Self {
        SendResult {
            verdict: Verdict::Retry { retry_after: None },
            started_at,
            latency: clock.elapsed(),
            status: None,
            error: Some(error),
            response: None,
        }
    }
}

/// An error with its causes, the request URL left out.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    match e.url() {
        Some(url) => text.replace(url.as_str(), "<url>"),
        None => text,
    }
}

/// The start of a response body, as text (lossy), at most [`KEPT_RESPONSE_BYTES`].
pub async fn read_response(mut response: reqwest::Response) -> String {
    let mut kept: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = KEPT_RESPONSE_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if kept.len() >= KEPT_RESPONSE_BYTES {
            break;
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The three ways out.
pub enum Transport {
    Webhook(WebhookTransport),
    Emarsys(EmarsysTransport),
    Amqp(AmqpTransport),
}

impl Transport {
    fn build(settings: &Settings, d: &DestinationSettings) -> anyhow::Result<Self> {
        Ok(match d.kind {
            DestinationKind::Webhook => Transport::Webhook(WebhookTransport {
                client: http_client(d.timeout)?,
                url: reqwest::Url::parse(&d.url)?,
                signer: Signer::new(&parse_secrets(d.secret.expose()).map_err(anyhow::Error::msg)?),
                concurrency: d.concurrency,
            }),
            DestinationKind::Emarsys => Transport::Emarsys(EmarsysTransport::new(
                http_client(d.timeout)?,
                settings.destination_url(d),
                d.emarsys(),
                d.secret.clone(),
                d.concurrency,
            )),
            DestinationKind::Amqp => Transport::Amqp(AmqpTransport::new(
                &settings.destination_url(d),
                &d.exchange,
                &d.name,
                d.timeout,
            )?),
        })
    }

    async fn send(&mut self, rows: &[OutboxRow], budget: &Budget) -> Vec<SendResult> {
        match self {
            Transport::Webhook(t) => t.send(rows, budget).await,
            Transport::Emarsys(t) => t.send(rows, budget).await,
            Transport::Amqp(t) => t.send(rows, budget).await,
        }
    }

    async fn close(&mut self) {
        if let Transport::Amqp(t) = self {
            t.close().await;
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    pub claimed: usize,
    pub delivered: usize,
    pub retried: usize,
    pub dead: usize,
}

impl StepReport {
    pub fn is_idle(&self) -> bool {
        self.claimed == 0
    }
}

/// The row's fate after one attempt: the verdict, with a retry past the end of the row's
/// schedule turned into dead.
pub fn decide(
    row: &OutboxRow,
    verdict: Verdict,
    policy: &RetryPolicy,
    now_ms: i64,
    random: f64,
) -> AttemptResult {
    match verdict {
        Verdict::Delivered => AttemptResult::Delivered,
        Verdict::Dead => AttemptResult::Dead,
        Verdict::Retry { retry_after } => {
            let failed = u32::try_from(row.attempts + 1).unwrap_or(u32::MAX);
            match next_delay(
                &parse_schedule(&row.schedule),
                failed,
                retry_after,
                policy,
                random,
            ) {
                Some(delay) => AttemptResult::Retry {
                    next_attempt_at: now_ms
                        .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                },
                None => AttemptResult::Dead,
            }
        }
    }
}

pub struct Worker {
    destination: String,
    store: Arc<dyn Store>,
    transport: Transport,
    budget: Budget,
    /// This worker's lease id: its claims carry it, and shutdown releases them by it.
    owner: String,
    policy: RetryPolicy,
    lease: Duration,
    batch: usize,
    coalesce: bool,
    poll: Duration,
    /// A provider asked us to wait (`Retry-After`): no claims before then.
    paused_until: Option<Instant>,
    meters: Meters,
}

/// The destination's metric handles, registered once (not per attempt).
struct Meters {
    delivered: metrics::Counter,
    retry: metrics::Counter,
    dead: metrics::Counter,
    latency: metrics::Histogram,
}

impl Meters {
    fn new(destination: &str) -> Self {
        let attempts = |outcome: &'static str| metrics::counter!("subgate_delivery_attempts_total", "destination" => destination.to_owned(), "outcome" => outcome);
        Meters {
            delivered: attempts("delivered"),
            retry: attempts("retry"),
            dead: attempts("dead"),
            latency: metrics::histogram!("subgate_delivery_seconds", "destination" => destination.to_owned()),
        }
    }

    fn count(&self, result: AttemptResult) {
        match result {
            AttemptResult::Delivered => self.delivered.increment(1),
            AttemptResult::Retry { .. } => self.retry.increment(1),
            AttemptResult::Dead => self.dead.increment(1),
        }
    }
}

impl Worker {
    pub fn new(
        settings: &Settings,
        d: &DestinationSettings,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        let per_minute = d.rate_per_minute();
        let mut batch = d.batch();
        // A claim must not outlive its lease: at most ~15 s of the rate budget, and (for one
        // request per row) at most half a lease of back-to-back timeouts per request slot.
        if per_minute > 0 {
            batch = batch.min((per_minute as usize / 4).max(1));
        }
        let one_request_per_row = match d.kind {
            DestinationKind::Webhook => true,
            DestinationKind::Emarsys => !d.emarsys().event_ids.is_empty(),
            DestinationKind::Amqp => false,
        };
        if one_request_per_row {
            let rounds = (settings.delivery.lease.as_millis() / (2 * d.timeout.as_millis()).max(1))
                .max(1) as usize;
            batch = batch.min(d.concurrency.saturating_mul(rounds));
        }
        Ok(Worker {
            destination: d.name.clone(),
            store,
            transport: Transport::build(settings, d)?,
            budget: Budget::per_minute(per_minute),
            owner: format!(
                "{}:{}:{:08x}",
                d.name,
                std::process::id(),
                fastrand::u32(..)
            ),
            policy: RetryPolicy {
                jitter_percent: settings.delivery.jitter_percent,
                max_retry_after: settings.delivery.max_retry_after,
            },
            lease: settings.delivery.lease,
            batch,
            coalesce: d.kind == DestinationKind::Emarsys,
            poll: settings.delivery.poll_interval,
            paused_until: None,
            meters: Meters::new(&d.name),
        })
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }

    fn claim_request(&self) -> ClaimRequest {
        let now = crate::clock::now_ms();
        ClaimRequest {
            destination: self.destination.clone(),
            owner: self.owner.clone(),
            now,
            lease_until: now
                .saturating_add(i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)),
            limit: self.batch,
            coalesce: self.coalesce,
        }
    }

    /// Claim in a blocking task (the store's single writer; a short transaction).
    fn spawn_claim(&self) -> JoinHandle<Result<Vec<OutboxRow>, StoreError>> {
        let store = self.store.clone();
        let claim = self.claim_request();
        tokio::task::spawn_blocking(move || {
            let rows = store.claim_deliveries(&claim)?;
            with_current_consent(store.as_ref(), rows)
        })
    }

    fn spawn_record(&self, attempts: Vec<AttemptRecord>) -> JoinHandle<Result<(), StoreError>> {
        let store = self.store.clone();
        let owner = self.owner.clone();
        let destination = self.destination.clone();
        tokio::task::spawn_blocking(move || store.record_attempts(&destination, &owner, &attempts))
    }

    /// Give back every lease this worker holds (its rows go out again later: at least once).
    fn spawn_release(&self) -> JoinHandle<Result<usize, StoreError>> {
        let store = self.store.clone();
        let (destination, owner) = (self.destination.clone(), self.owner.clone());
        tokio::task::spawn_blocking(move || store.release_leases(&destination, &owner))
    }

    /// Turn the transport's answers into attempt records (and metrics).
    fn judge(&self, rows: &[OutboxRow], results: Vec<SendResult>) -> Judged {
        let now = crate::clock::now_ms();
        let mut report = StepReport {
            claimed: rows.len(),
            ..StepReport::default()
        };
        let mut pause: Option<Duration> = None;
        let attempts = rows
            .iter()
            .zip(results)
            .map(|(row, r)| {
                let result = decide(row, r.verdict, &self.policy, now, fastrand::f64());
                match result {
                    AttemptResult::Delivered => report.delivered += 1,
                    AttemptResult::Retry { next_attempt_at } => {
                        report.retried += 1;
                        if let Verdict::Retry {
                            retry_after: Some(_),
                        } = r.verdict
                        {
                            let wait = Duration::from_millis((next_attempt_at - now).max(0) as u64);
                            pause = Some(pause.map_or(wait, |p| p.max(wait)));
                        }
                    }
                    AttemptResult::Dead => {
                        report.dead += 1;
                        tracing::warn!(
                            destination = %self.destination,
                            outbox_id = row.id,
                            status = r.status,
                            error = r.error.as_deref().unwrap_or(""),
                            "delivery dead"
                        );
                    }
                }
                self.meters.count(result);
                self.meters.latency.record(r.latency.as_secs_f64());
                AttemptRecord {
                    outbox_id: row.id,
                    attempt: row.attempts + 1,
                    started_at: r.started_at,
                    latency_ms: i64::try_from(r.latency.as_millis()).unwrap_or(i64::MAX),
                    result,
                    status: r.status,
                    error: r.error,
                    response: r.response,
                }
            })
            .collect();
        Judged {
            attempts,
            report,
            pause,
        }
    }

    fn pause_for(&mut self, wait: Duration) {
        tracing::info!(destination = %self.destination, seconds = wait.as_secs_f64(), "provider asked to wait; pausing");
        self.paused_until = Some(Instant::now() + wait);
    }

    /// One step: claim due rows, send them, record the attempts. Deterministic for tests.
    #[tracing::instrument(skip_all, fields(destination = %self.destination))]
    pub async fn step(&mut self) -> Result<StepReport, StoreError> {
        let rows = join(self.spawn_claim()).await?;
        if rows.is_empty() {
            return Ok(StepReport::default());
        }
        let results = self.transport.send(&rows, &self.budget).await;
        let judged = self.judge(&rows, results);
        join(self.spawn_record(judged.attempts)).await?;
        if let Some(wait) = judged.pause {
            self.pause_for(wait);
        }
        Ok(judged.report)
    }

    fn spawn_record_then_claim(
        &self,
        attempts: Vec<AttemptRecord>,
    ) -> JoinHandle<Result<Vec<OutboxRow>, StoreError>> {
        let store = self.store.clone();
        let claim = self.claim_request();
        tokio::task::spawn_blocking(move || match store.record_then_claim(&attempts, &claim) {
            Ok(rows) => with_current_consent(store.as_ref(), rows),
            // The claim must not take the answers down with it (they would be sent again once
            // the leases expire, and their attempts would be missing): record them on their
            // own (PostgreSQL: on another pooled connection), and claim nothing this time.
            Err(e) if !attempts.is_empty() => {
                tracing::warn!(
                    destination = %claim.destination,
                    error = %e,
                    "recording and claiming in one transaction failed; recording alone"
                );
                store
                    .record_attempts(&claim.destination, &claim.owner, &attempts)
                    .map(|()| Vec::new())
            }
            Err(e) => Err(e),
        })
    }

    /// Deliver until nothing is due (or `stop`), pipelined: while batch k+1 is on the wire,
    /// one transaction records batch k and claims batch k+2, so the store's work overlaps the
    /// provider's and costs one commit per batch. Claimed rows carry this worker's lease, so a
    /// batch claimed ahead never overlaps the one in flight, and per-entity order holds (a row
    /// waits while an earlier one of its entity is pending, leased or not). Webhooks (one
    /// request per row) go through [`Worker::drain_rows`], which does not wait at batch ends.
    pub async fn drain(&mut self, stop: &CancellationToken) -> Result<StepReport, StoreError> {
        if matches!(self.transport, Transport::Webhook(_)) {
            return self.drain_rows(stop).await;
        }
        let mut total = StepReport::default();
        let mut current = join(self.spawn_claim()).await?;
        if current.is_empty() {
            return Ok(total);
        }
        let mut ahead = self.spawn_claim();
        loop {
            let results = tokio::select! {
                r = self.transport.send(&current, &self.budget) => Some(r),
                _ = stop.cancelled() => None,
            };
            let Some(results) = results else {
                // Stopping: what was in flight stays pending (sent again later); the caller
                // releases the leases.
                join(ahead).await?;
                return Ok(total);
            };
            let judged = self.judge(&current, results);
            total.claimed += judged.report.claimed;
            total.delivered += judged.report.delivered;
            total.retried += judged.report.retried;
            total.dead += judged.report.dead;
            let next = join(ahead).await?;
            if let Some(wait) = judged.pause {
                join(self.spawn_record(judged.attempts)).await?;
                if !next.is_empty() {
                    // Claimed ahead but not sent: give them back before waiting.
                    join(self.spawn_release()).await?;
                }
                self.pause_for(wait);
                return Ok(total);
            }
            if next.is_empty() {
                current = join(self.spawn_record_then_claim(judged.attempts)).await?;
                if current.is_empty() {
                    return Ok(total);
                }
                ahead = self.spawn_claim();
            } else {
                ahead = self.spawn_record_then_claim(judged.attempts);
                current = next;
            }
        }
    }

    /// [`Worker::drain`] for webhooks, row by row: `concurrency` requests stay in flight across
    /// batch ends (a new request starts as soon as one is answered, so there is no tail at the
    /// end of each batch), and the store works beside them: one transaction records what was
    /// answered since the last one and claims the next batch as soon as the one claimed before
    /// starts going out (so a slow commit is absorbed by a whole batch of requests, not waited
    /// for). The guarantees are the batch drain's: rows are claimed with this worker's lease
    /// and only as heads of their entity, and a row stays pending (blocking its entity's next
    /// rows) until the transaction that records its answer commits. A batch is claimed once
    /// fewer than a batch of rows are waiting or on the wire, so, as in the batch drain, a row
    /// waits for at most two batches of requests (its own included) and a claim does not outlive
    /// its lease. A `Retry-After` stops new requests; what was answered is recorded, what was
    /// claimed but not sent is given back, and the worker pauses. On `stop`, requests in flight
    /// are dropped (sent again later: at least once); what was answered is recorded.
    async fn drain_rows(&mut self, stop: &CancellationToken) -> Result<StepReport, StoreError> {
        // One value on the stack per wake-up, never stored: boxing the answer would only add an
        // allocation per request.
        #[allow(clippy::large_enum_variant)]
        enum Event {
            Answered(OutboxRow, SendResult),
            Stored(Result<Vec<OutboxRow>, StoreError>),
            Stop,
        }
        let Transport::Webhook(webhook) = &self.transport else {
            return Err(StoreError::Failed("drain_rows is for webhooks".into()));
        };
        let budget = &self.budget;
        let concurrency = webhook.concurrency.max(1);
        let mut total = StepReport::default();
        let mut queue: VecDeque<OutboxRow> = VecDeque::new();
        let mut in_flight = FuturesUnordered::new();
        let mut answered: Vec<(OutboxRow, SendResult)> = Vec::new();
        // The one store transaction under way, and whether it claims.
        let mut op: Option<JoinHandle<Result<Vec<OutboxRow>, StoreError>>> = None;
        let mut op_claims = false;
        // The last claim found nothing due: claim again only with records (which can make the
        // next row of an entity its head) or once everything is settled.
        let mut dry = false;
        // A provider asked to wait: no new requests.
        let mut pausing = false;
        let mut pause: Option<Duration> = None;
        loop {
            while !pausing && in_flight.len() < concurrency {
                let Some(row) = queue.pop_front() else { break };
                in_flight.push(async move {
                    let result = webhook.send_one(&row, budget).await;
                    (row, result)
                });
            }
            if op.is_none() {
                let settled = in_flight.is_empty() && queue.is_empty();
                // Claim once fewer than a batch of rows are waiting or on the wire: a row
                // claimed now waits for at most two batches' worth of requests (its own
                // included), as in the batch drain, so the lease bound of `Worker::new` holds.
                let claim = !pausing
                    && queue.len() + in_flight.len() < self.batch
                    && (!dry || !answered.is_empty());
                let record = answered.len() >= self.batch || (settled && !answered.is_empty());
                if claim || record {
                    let attempts = if answered.is_empty() {
                        Vec::new()
                    } else {
                        let judged = self.judge_answers(std::mem::take(&mut answered));
                        add(&mut total, &judged.report);
                        pause = max_pause(pause, judged.pause);
                        judged.attempts
                    };
                    op_claims = claim;
                    op = Some(if claim {
                        self.spawn_record_then_claim(attempts)
                    } else {
                        let record = self.spawn_record(attempts);
                        tokio::spawn(async move { join(record).await.map(|()| Vec::new()) })
                    });
                }
            }
            if op.is_none() && in_flight.is_empty() && (queue.is_empty() || pausing) {
                // Settled: everything answered is recorded and the last claim found nothing
                // (or a provider asked to wait).
                if !answered.is_empty() {
                    let judged = self.judge_answers(std::mem::take(&mut answered));
                    add(&mut total, &judged.report);
                    pause = max_pause(pause, judged.pause);
                    join(self.spawn_record(judged.attempts)).await?;
                }
                if pausing && !queue.is_empty() {
                    // Claimed but not sent: give them back before waiting.
                    queue.clear();
                    join(self.spawn_release()).await?;
                }
                break;
            }
            let event = tokio::select! {
                Some((row, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    Event::Answered(row, result)
                }
                stored = async { op.as_mut().expect("guarded by op.is_some()").await }, if op.is_some() => {
                    Event::Stored(stored.unwrap_or_else(|e| {
                        Err(StoreError::Unavailable(format!("store task failed: {e}")))
                    }))
                }
                _ = stop.cancelled() => Event::Stop,
            };
            match event {
                Event::Answered(row, result) => {
                    if let Verdict::Retry {
                        retry_after: Some(_),
                    } = result.verdict
                    {
                        pausing = true;
                    }
                    answered.push((row, result));
                }
                Event::Stored(rows) => {
                    op = None;
                    let rows = rows?;
                    if op_claims {
                        dry = rows.is_empty();
                        queue.extend(rows);
                    }
                }
                Event::Stop => {
                    // Requests in flight are dropped: their rows stay pending and go out again.
                    drop(in_flight);
                    if let Some(task) = op.take() {
                        join(task).await?;
                    }
                    if !answered.is_empty() {
                        let judged = self.judge_answers(answered);
                        add(&mut total, &judged.report);
                        join(self.spawn_record(judged.attempts)).await?;
                    }
                    return Ok(total);
                }
            }
        }
        drop(in_flight);
        if let Some(wait) = pause {
            self.pause_for(wait);
        }
        Ok(total)
    }

    /// [`Worker::judge`] for rows answered one by one.
    fn judge_answers(&self, answered: Vec<(OutboxRow, SendResult)>) -> Judged {
        let (rows, results): (Vec<OutboxRow>, Vec<SendResult>) = answered.into_iter().unzip();
        self.judge(&rows, results)
    }

    /// Drain until `shutdown`; then release this worker's leases (rows claimed but not yet
    /// answered go back to pending and are sent again later: at least once).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            if let Some(until) = self.paused_until.take() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
            let wait = match self.drain(&shutdown).await {
                Ok(report) if report.is_idle() => Some(self.poll),
                Ok(_) => {
                    failures = 0;
                    None
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(destination = %self.destination, error = %e, "delivery step failed");
                    Some(crate::sources::amqp::backoff_delay(
                        failures,
                        self.poll,
                        Duration::from_secs(30),
                    ))
                }
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        self.transport.close().await;
        match join(self.spawn_release()).await {
            Ok(n) => {
                tracing::info!(destination = %self.destination, released = n, "delivery worker stopped")
            }
            Err(e) => {
                tracing::warn!(destination = %self.destination, error = %e, "leases not released; they expire")
            }
        }
        // The worker may hold the store's last handle: a PostgreSQL client closes its
        // connection by blocking, which must not happen on a runtime thread.
        let store = self.store.clone();
        drop(self);
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

/// What a batch's answers mean.
struct Judged {
    attempts: Vec<AttemptRecord>,
    report: StepReport,
    pause: Option<Duration>,
}

/// A replayed row was written before whatever happened while it lay dead: its contact's consents
/// are read again from the ledger, so a replay never tells a provider an outdated opt-in. (Rows
/// that were never dead need not be: the contact guard sends a contact's rows in commit order,
/// each with the ledger's state at its commit.) A failed read fails the claim: its rows wait for
/// their lease to expire rather than go out with what may be an outdated opt-in.
fn with_current_consent(
    store: &dyn Store,
    mut rows: Vec<OutboxRow>,
) -> Result<Vec<OutboxRow>, StoreError> {
    for row in rows.iter_mut().filter(|r| r.replays > 0) {
        let mut lookup = |key: &str| store.get_record(crate::consent::CONSENT, key);
        if let Some(payload) = super::contact::refresh_payload(&row.payload, &mut lookup)? {
            row.payload = payload;
        }
    }
    Ok(rows)
}

fn add(total: &mut StepReport, report: &StepReport) {
    total.claimed += report.claimed;
    total.delivered += report.delivered;
    total.retried += report.retried;
    total.dead += report.dead;
}

fn max_pause(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

async fn join<T>(task: JoinHandle<Result<T, StoreError>>) -> Result<T, StoreError> {
    task.await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeliveryState;

    fn row(attempts: i64, schedule: &str) -> OutboxRow {
        OutboxRow {
            id: 1,
            destination: "d".into(),
            source: "erp".into(),
            kind: "customer.changed".into(),
            entity: "erp:customer:1".into(),
            contact_key: None,
            inbox_id: 1,
            payload: "{}".into(),
            coalesce: false,
            schedule: schedule.into(),
            created_at: 0,
            state: DeliveryState::Pending,
            attempts,
            next_attempt_at: 0,
            locked_until: None,
            last_status: None,
            last_error: None,
            last_response: None,
            finished_at: None,
            superseded_by: None,
            replays: 0,
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        jitter_percent: 0,
        max_retry_after: Duration::from_secs(60),
    };

    #[test]
    fn a_retry_past_the_schedule_is_dead() {
        let retry = Verdict::Retry { retry_after: None };
        assert_eq!(
            decide(&row(0, "5000,30000"), retry, &POLICY, 1000, 0.5),
            AttemptResult::Retry {
                next_attempt_at: 6000
            }
        );
        assert_eq!(
            decide(&row(1, "5000,30000"), retry, &POLICY, 1000, 0.5),
            AttemptResult::Retry {
                next_attempt_at: 31_000
            }
        );
        assert_eq!(
            decide(&row(2, "5000,30000"), retry, &POLICY, 1000, 0.5),
            AttemptResult::Dead
        );
        assert_eq!(
            decide(&row(0, ""), Verdict::Delivered, &POLICY, 0, 0.5),
            AttemptResult::Delivered
        );
        assert_eq!(
            decide(&row(0, "5000"), Verdict::Dead, &POLICY, 0, 0.5),
            AttemptResult::Dead
        );
    }
}
