//! PostgreSQL backend: several subgate instances share one database.
//!
//! Same model as SQLite (one writer connection per instance for the ingest transaction, a small
//! pool of readers), plus what sharing needs:
//! - the inbox's unique dedupe key decides "first time or replay" across instances (a concurrent
//!   insert of the same key waits for the other transaction, then sees the conflict);
//! - a read-modify-write of a record takes a transaction-scoped advisory lock on (kind, key)
//!   first (it covers records that do not exist yet, which a row lock cannot), so two instances
//!   changing one customer serialise instead of losing an update; creations are insert-only;
//! - the ingest writer names the records a batch will touch up front
//!   ([`StoreTx::prefetch_records`]): their advisory locks are taken in one statement, in lock-id
//!   order (two instances locking overlapping batches cannot deadlock on them), and their heads
//!   read in the next statement; change detection then runs from memory, and the batch's record
//!   writes and inbox outcomes are held back and written set-based in one statement before commit
//!   (or before a savepoint, or a read that needs them). Round trips per batch, not per event;
//! - deadlocks and serialization failures are [`StoreError::Conflict`]: the ingest writer retries
//!   the batch;
//! - migrations run under a session advisory lock, so `subgate migrate` is safe from several
//!   instances at once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use postgres::{config::SslMode, error::SqlState, types::ToSql, Client, NoTls, Row, Statement};
use serde_json::Value;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    AttemptRecord, AttemptRow, ClaimRequest, DeliveryFilter, DeliveryState, DestinationStats,
    HistoryEntry, InboxEntry, InboxEvent, InboxInsert, InboxStats, NewOutboxRow, OutboxRow, Record,
    RecordHead, RecordRow, ReplayOutcome, ReplayRequest, Store, StoreError, StoreTx,
};

/// The embedded migrations, in order (public for the migration tests).
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_core.sql"),
    include_str!("../../migrations/postgres/0002_outbox.sql"),
    include_str!("../../migrations/postgres/0003_drop_inbox_entity_index.sql"),
    include_str!("../../migrations/postgres/0004_outbox_retention.sql"),
    include_str!("../../migrations/postgres/0005_outbox_record_and_contact_keys.sql"),
];
/// Session advisory lock key held while migrating ("subgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_7562_6761_7465;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        // `Display` of a server error is only "db error"; the message says what went wrong.
        let text = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => with_causes(&e),
        };
        match e.code() {
            Some(code)
                if *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                StoreError::Conflict(text)
            }
            Some(code)
                if code.code().starts_with("08")
                    || code.code().starts_with("53")
                    || code.code().starts_with("57") =>
            {
                StoreError::Unavailable(text)
            }
            Some(_) => StoreError::Failed(text),
            // No SQLSTATE: the connection itself failed.
            None => StoreError::Unavailable(text),
        }
    }
}

/// An error with its causes: the `postgres` crate's `Display` says only "error connecting to
/// server", the cause says "Connection refused".
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        cause = c.source();
    }
    text
}

/// A connection with its prepared statements (the `postgres` crate does not cache them).
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// How sessions are opened: the parsed URL, TLS when the URL asks for it, the statement timeout.
#[derive(Clone)]
struct Connector {
    config: postgres::Config,
    /// `None`: plain TCP (no `sslmode`, or `sslmode=disable`).
    tls: Option<MakeRustlsConnect>,
    /// The URL without its password, for errors.
    shown: String,
    statement_timeout: Duration,
}

impl Connector {
    fn new(url: &str, options: &PostgresOptions) -> Result<Self, StoreError> {
        let shown = crate::config::redact_url(url);
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Failed(format!("store.url {shown}: {e}")))?;
        // An unreachable host must fail within seconds, not after TCP's own minutes.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // The crate logs NOTICEs at info ('relation "schema_migrations" already exists,
        // skipping' on every start): they are the server's chatter, not the operator's news.
        config.notice_callback(|notice| {
            tracing::debug!(
                target: "subgate::store::postgres::notice",
                severity = notice.severity(),
                code = notice.code().code(),
                "{}",
                notice.message()
            );
        });
        // TLS only when asked for: without `sslmode` the postgres crate would "prefer" TLS,
        // and a server with a certificate we cannot verify would then refuse us.
        let asked = url.contains("sslmode=") && config.get_ssl_mode() != SslMode::Disable;
        let tls = if asked {
            Some(MakeRustlsConnect::new(tls_config(&options.tls_ca_file)?))
        } else {
            None
        };
        Ok(Self {
            config,
            tls,
            shown,
            statement_timeout: options.statement_timeout,
        })
    }

    fn connect(&self) -> Result<Conn, StoreError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        let mut client = connected.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {}",
                self.shown,
                with_causes(&e)
            ))
        })?;
        if !self.statement_timeout.is_zero() {
            client.batch_execute(&format!(
                "SET statement_timeout = {}",
                self.statement_timeout.as_millis()
            ))?;
        }
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }
}

/// rustls with aws-lc-rs, trusting the Mozilla roots and the CA certificates of `ca_file`.
fn tls_config(ca_file: &str) -> Result<tokio_rustls::rustls::ClientConfig, StoreError> {
    use tokio_rustls::rustls::{self, crypto::aws_lc_rs, pki_types::pem::PemObject, RootCertStore};
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if !ca_file.is_empty() {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| StoreError::Failed(format!("store.tls_ca_file {ca_file}: {e}")))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| StoreError::Failed(format!("store.tls_ca_file {ca_file}: {e}")))?;
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Failed(format!("TLS for PostgreSQL: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// What the pool needs to make, check and discard connections.
struct Manager(Connector);

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = StoreError;

    fn connect(&self) -> Result<Conn, StoreError> {
        self.0.connect()
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), StoreError> {
        conn.client.simple_query("")?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}

/// The PostgreSQL-only part of `[store]`.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub pool_size: u32,
    pub pool_timeout: Duration,
    pub statement_timeout: Duration,
    pub tls_ca_file: String,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            pool_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            tls_ca_file: String::new(),
        }
    }
}

impl Conn {
    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, params)?)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.client.query(&s, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.client.query_opt(&s, params)?)
    }
}

pub struct PostgresStore {
    connector: Connector,
    /// The ingest writer's connection; reopened if it broke.
    writer: Mutex<Option<Conn>>,
    /// Reads and delivery bookkeeping: at most `store.pool_size` connections.
    readers: r2d2::Pool<Manager>,
    pool_timeout: Duration,
}

fn to_json(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn read_record(row: &Row) -> Result<Record, StoreError> {
    Ok(Record {
        kind: row.try_get(0)?,
        key: row.try_get(1)?,
        doc: from_json(row.try_get::<_, &str>(2)?),
        hash: row.try_get(3)?,
        occurred_at: row.try_get(4)?,
        changed_at: row.try_get(5)?,
        changed_by: row.try_get(6)?,
        seen_at: row.try_get(7)?,
        seen_by: row.try_get(8)?,
        version: row.try_get(9)?,
    })
}

fn read_history(row: &Row) -> Result<HistoryEntry, StoreError> {
    Ok(HistoryEntry {
        kind: row.try_get(0)?,
        key: row.try_get(1)?,
        at: row.try_get(2)?,
        inbox_id: row.try_get(3)?,
        doc: from_json(row.try_get::<_, &str>(4)?),
    })
}

/// The columns [`read_outbox`] reads (a macro, so statements stay `&'static str`).
macro_rules! outbox_columns {
    () => {
        "id, destination, source, kind, entity, inbox_id,
         (SELECT p.payload FROM outbox_payloads p WHERE p.id = payload_id), coalesce,
         schedule, created_at, state, attempts, next_attempt_at, locked_until, last_status,
         last_error, last_response, finished_at, superseded_by, replays, contact_key"
    };
}

fn read_outbox(row: &Row) -> Result<OutboxRow, StoreError> {
    let state: &str = row.try_get(10)?;
    Ok(OutboxRow {
        id: row.try_get(0)?,
        destination: row.try_get(1)?,
        source: row.try_get(2)?,
        kind: row.try_get(3)?,
        entity: row.try_get(4)?,
        inbox_id: row.try_get(5)?,
        payload: row.try_get::<_, Option<String>>(6)?.unwrap_or_default(),
        coalesce: row.try_get(7)?,
        schedule: row.try_get(8)?,
        created_at: row.try_get(9)?,
        state: DeliveryState::parse(state).unwrap_or(DeliveryState::Pending),
        attempts: row.try_get(11)?,
        next_attempt_at: row.try_get(12)?,
        locked_until: row.try_get(13)?,
        last_status: row.try_get(14)?,
        last_error: row.try_get(15)?,
        last_response: row.try_get(16)?,
        finished_at: row.try_get(17)?,
        superseded_by: row.try_get(18)?,
        replays: row.try_get(19)?,
        contact_key: row.try_get(20)?,
    })
}

/// Run `f` in one transaction on `conn` (delivery bookkeeping: claims, attempts, replays). Every
/// instance's workers run these on pooled connections, apart from the ingest writer.
fn in_tx<T>(
    conn: &mut Conn,
    f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.client.batch_execute("BEGIN")?;
    match f(conn) {
        Ok(v) => match conn.client.batch_execute("COMMIT") {
            Ok(()) => Ok(v),
            Err(e) => Err(match StoreError::from(e) {
                e @ StoreError::Conflict(_) => e,
                other => StoreError::Unavailable(format!("commit failed: {other}")),
            }),
        },
        Err(e) => {
            let _ = conn.client.batch_execute("ROLLBACK");
            Err(e)
        }
    }
}

/// One retention chunk (`$1` finished before, `$2` rows): the oldest finished rows, their
/// attempts, and their payloads once no row outside the chunk uses them. One statement: every
/// part sees the same snapshot, so a payload is kept when a row outside this purge still uses it.
/// Rows another instance is purging are skipped. The payload check is a scalar subquery with
/// `LIMIT 1` (one probe of `outbox_payload` per payload), not a `NOT EXISTS`: PostgreSQL planned
/// that anti-join as a hash join over the whole outbox, so every chunk read every row (65 of the
/// 174 ms a chunk took with 200,000 rows; 31 ms now, whatever the outbox's size).
#[doc(hidden)]
pub const PURGE_FINISHED: &str = "WITH doomed AS (
         SELECT id, payload_id FROM outbox
         WHERE state IN ('delivered', 'superseded') AND finished_at < $1
         ORDER BY id LIMIT $2
         FOR UPDATE SKIP LOCKED
     ), attempts AS (
         DELETE FROM delivery_attempts WHERE outbox_id IN (SELECT id FROM doomed)
     ), gone AS (
         DELETE FROM outbox WHERE id IN (SELECT id FROM doomed) RETURNING id
     ), payloads AS (
         DELETE FROM outbox_payloads p
         WHERE p.id IN (SELECT payload_id FROM doomed)
           AND (SELECT o.id FROM outbox o
                WHERE o.payload_id = p.id AND o.id NOT IN (SELECT id FROM doomed)
                LIMIT 1) IS NULL
     )
     SELECT COUNT(*) FROM gone";

/// The due head rows a claim leases (`$1` destination, `$2` now, `$3` limit), locked.
///
/// Across instances: `FOR UPDATE SKIP LOCKED` makes a row another transaction is claiming (or
/// recording) invisible to this claim instead of a wait, and a row whose claim committed in the
/// meantime is re-checked on its new version (its lease now holds, so it is left out). The
/// ordering guard (a row is its key's first pending row) sees pending rows whether they are
/// leased or locked, so a later row of a key never goes out while an earlier one is in flight
/// elsewhere. It is a correlated `min(id)`, not a `NOT EXISTS`: PostgreSQL turns a `NOT EXISTS`
/// into an anti-join, and with statistics from when the outbox was small (autovacuum lags
/// behind a burst) it planned that join as a scan of every pending row of the destination per
/// candidate: 0.9 s and 302,000 buffers to claim 128 of 11,000 pending rows. The subquery is one
/// probe of `outbox_pending_entity` per candidate whatever the statistics say (1 ms, 517
/// buffers).
macro_rules! claim_candidates {
    () => {
        "SELECT id FROM outbox o
         WHERE destination = $1 AND state = 'pending' AND next_attempt_at <= $2
           AND (locked_until IS NULL OR locked_until <= $2)
           AND o.id = (SELECT min(p.id) FROM outbox p
                       WHERE p.destination = o.destination AND p.entity = o.entity
                         AND p.state = 'pending')
           AND (o.contact_key IS NULL
                OR o.id = (SELECT min(k.id) FROM outbox k
                           WHERE k.destination = o.destination AND k.contact_key = o.contact_key
                             AND k.state = 'pending'))
         ORDER BY next_attempt_at, id LIMIT $3
         FOR UPDATE SKIP LOCKED"
    };
}

/// [`claim_candidates!`]'s text, for tests that check its plan.
#[doc(hidden)]
pub const CLAIM_CANDIDATES: &str = claim_candidates!();

/// Lease up to `limit` due head rows of one destination (see [`Store::claim_deliveries`] and
/// [`claim_candidates!`]).
fn claim_deliveries(conn: &mut Conn, c: &ClaimRequest) -> Result<Vec<OutboxRow>, StoreError> {
    let limit = c.limit as i64;
    let mut heads = conn
        .query(
            concat!(
                "UPDATE outbox SET locked_until = $4, lease_owner = $5 WHERE id IN (",
                claim_candidates!(),
                ") RETURNING ",
                outbox_columns!()
            ),
            &[&c.destination, &c.now, &limit, &c.lease_until, &c.owner],
        )?
        .iter()
        .map(read_outbox)
        .collect::<Result<Vec<_>, _>>()?;
    // RETURNING has no order: oldest due first, as selected.
    heads.sort_by_key(|r| (r.next_attempt_at, r.id));
    if c.coalesce {
        for head in heads.iter_mut() {
            if head.coalesce {
                coalesce_into_latest(conn, c, head)?;
            }
        }
    }
    Ok(heads)
}

/// Replace `head` by the latest of the run of pending snapshot rows of its key that follows it;
/// the rows in between are marked superseded. (Later rows of the key cannot be claimed
/// elsewhere while `head` is pending: the ordering guard holds them back.)
fn coalesce_into_latest(
    conn: &mut Conn,
    c: &ClaimRequest,
    head: &mut OutboxRow,
) -> Result<(), StoreError> {
    let later = conn.query(
        "SELECT id, coalesce FROM outbox
         WHERE destination = $1 AND entity = $2 AND state = 'pending' AND id > $3
         ORDER BY id",
        &[&c.destination, &head.entity, &head.id],
    )?;
    // A pending row of another record about the same contact is a barrier: jumping over it
    // would send this contact's newer state before an older one.
    let barrier: Option<i64> = match &head.contact_key {
        Some(contact) => match conn.query_opt(
            "SELECT min(id) FROM outbox
             WHERE destination = $1 AND contact_key = $2 AND state = 'pending' AND id > $3
               AND entity <> $4",
            &[&c.destination, contact, &head.id, &head.entity],
        )? {
            Some(row) => row.try_get(0)?,
            None => None,
        },
        None => None,
    };
    let mut latest = None;
    for row in &later {
        let snapshot: bool = row.try_get(1)?;
        let id: i64 = row.try_get(0)?;
        if !snapshot || barrier.is_some_and(|b| id >= b) {
            break;
        }
        latest = Some(id);
    }
    let Some(latest) = latest else {
        return Ok(());
    };
    conn.execute(
        "UPDATE outbox SET state = 'superseded', superseded_by = $4, finished_at = $5,
                locked_until = NULL, lease_owner = NULL
         WHERE destination = $1 AND entity = $2 AND state = 'pending' AND id >= $3 AND id < $4",
        &[&c.destination, &head.entity, &head.id, &latest, &c.now],
    )?;
    let replacement = conn
        .query_opt(
            concat!(
                "UPDATE outbox SET attempts = $2, locked_until = $3, lease_owner = $4
                 WHERE id = $1 RETURNING ",
                outbox_columns!()
            ),
            &[&latest, &head.attempts, &c.lease_until, &c.owner],
        )?
        .ok_or_else(|| StoreError::Conflict(format!("outbox row {latest} vanished")))?;
    *head = read_outbox(&replacement)?;
    Ok(())
}

/// Record a batch of attempts: each one's row in `delivery_attempts`, and its outbox row's new
/// state (only while this owner's lease holds on it). One statement for the whole batch, the
/// attempts' values as arrays (it was two statements, four round trips, per attempt). A batch
/// holds at most one attempt per row: a row is claimed again only once its attempt is recorded.
fn record_attempts(
    conn: &mut Conn,
    destination: &str,
    owner: &str,
    attempts: &[AttemptRecord],
) -> Result<(), StoreError> {
    if attempts.is_empty() {
        return Ok(());
    }
    let n = attempts.len();
    let (mut ids, mut numbers, mut started, mut latency) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut outcomes, mut statuses, mut errors, mut responses) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut states, mut nexts, mut finished) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for a in attempts {
        let (state, next, done) = a.row_outcome();
        ids.push(a.outbox_id);
        numbers.push(a.attempt);
        started.push(a.started_at);
        latency.push(a.latency_ms);
        outcomes.push(a.result.as_str());
        statuses.push(a.status.map(i64::from));
        errors.push(a.error.as_deref());
        responses.push(a.response.as_deref());
        states.push(state);
        nexts.push(next);
        finished.push(done);
    }
    // The arrays are read twice (parameters can be): an `unnest` in the `UPDATE`'s own `FROM`
    // is joined by primary key, where a shared CTE was planned as a nested loop over a re-sorted
    // subquery (100 ms for 512 attempts with statistics from a fresh outbox).
    conn.execute(
        "WITH recorded AS (
           INSERT INTO delivery_attempts (outbox_id, destination, attempt, started_at, latency_ms,
                                          outcome, status, error, response, next_attempt_at)
           SELECT a.outbox_id, $12, a.attempt, a.started_at, a.latency_ms, a.outcome, a.status,
                  a.error, a.response, a.next_attempt_at
           FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::text[], $6::int8[],
                       $7::text[], $8::text[], $9::int8[])
                  WITH ORDINALITY AS a(outbox_id, attempt, started_at, latency_ms, outcome,
                                       status, error, response, next_attempt_at, n)
           ORDER BY a.n
         )
         UPDATE outbox o SET state = a.state, attempts = a.attempt,
                next_attempt_at = COALESCE(a.next_attempt_at, o.next_attempt_at),
                locked_until = NULL, lease_owner = NULL, last_status = a.status,
                last_error = a.error, last_response = a.response, finished_at = a.finished_at
         FROM unnest($1::int8[], $2::int8[], $6::int8[], $7::text[], $8::text[], $9::int8[],
                     $10::text[], $11::int8[])
                AS a(outbox_id, attempt, status, error, response, next_attempt_at, state,
                     finished_at)
         WHERE o.id = a.outbox_id AND o.state = 'pending' AND o.lease_owner = $13",
        &[
            &ids,
            &numbers,
            &started,
            &latency,
            &outcomes,
            &statuses,
            &errors,
            &responses,
            &nexts,
            &states,
            &finished,
            &destination,
            &owner,
        ],
    )?;
    Ok(())
}

impl PostgresStore {
    /// Connect with the default pool, timeouts and TLS roots.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &PostgresOptions::default())
    }

    pub fn open_with(url: &str, options: &PostgresOptions) -> Result<Self, StoreError> {
        let connector = Connector::new(url, options)?;
        // The writer first: an unreachable database fails `serve` at once, with the reason.
        let writer = connector.connect()?;
        let readers = r2d2::Pool::builder()
            .max_size(options.pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(options.pool_timeout)
            // A broken connection is seen by `has_broken` when it comes back; checking every
            // checkout would cost a round trip per read.
            .test_on_check_out(false)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager(connector.clone()));
        Ok(Self {
            connector,
            writer: Mutex::new(Some(writer)),
            readers,
            pool_timeout: options.pool_timeout,
        })
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.readers.get().map_err(|e| {
            // The pool's own message is only "timed out"; a connection attempt says why.
            let cause = match self.connector.connect() {
                Ok(_) => e.to_string(),
                Err(connect) => connect.message().to_owned(),
            };
            StoreError::Unavailable(format!(
                "no pooled PostgreSQL connection within {:?}: {cause}",
                self.pool_timeout
            ))
        })?;
        f(&mut conn)
    }

    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = Some(self.connector.connect()?);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(StoreError::Unavailable("no writer connection".into()));
        };
        f(conn)
    }
}

/// `(kind, key)` of a record.
type RecordKey = (String, String);

fn record_key(kind: &str, key: &str) -> RecordKey {
    (kind.to_owned(), key.to_owned())
}

/// A record this transaction locked and read ahead ([`StoreTx::prefetch_records`]).
#[derive(Debug, Clone)]
struct Known {
    /// As this transaction sees it now, its own held-back writes included; `None`: no record.
    head: Option<RecordHead>,
    /// Whether the row exists as this transaction's statements see it (flushed writes
    /// included): a held-back put of a record not stored yet is a creation, insert-only.
    stored: bool,
}

/// A record row held back, owning its values.
#[derive(Debug, Clone)]
struct HeldRow {
    doc: String,
    hash: String,
    occurred_at: Option<i64>,
    changed_at: i64,
    changed_by: i64,
    seen_at: i64,
    seen_by: i64,
    version: i64,
}

/// The last write held back for one known record.
#[derive(Debug, Clone)]
enum Held {
    Put(HeldRow),
    Touch {
        seen_at: i64,
        seen_by: i64,
        occurred_at: Option<i64>,
    },
}

struct Tx<'c> {
    conn: &'c mut Conn,
    /// The last outbox payload written and its id: the rows of one event for several
    /// destinations share it.
    last_payload: Option<(String, i64)>,
    /// Records locked and read ahead by `prefetch_records`. Only these are answered from memory
    /// and have writes held back; every other record takes the statement-per-call path.
    known: HashMap<RecordKey, Known>,
    /// Record writes held back until `flush`, the last per key (ordered: a flush touches rows in
    /// a fixed order).
    held: BTreeMap<RecordKey, Held>,
    /// Inbox outcomes held back until `flush` (only once `prefetch_records` ran).
    held_outcomes: Vec<(i64, String)>,
    batching: bool,
    /// `known` as it was at each open savepoint (a rollback restores it).
    savepoints: Vec<HashMap<RecordKey, Known>>,
}

impl<'c> Tx<'c> {
    fn new(conn: &'c mut Conn) -> Self {
        Tx {
            conn,
            last_payload: None,
            known: HashMap::new(),
            held: BTreeMap::new(),
            held_outcomes: Vec::new(),
            batching: false,
            savepoints: Vec::new(),
        }
    }
}

impl Tx<'_> {
    /// A transaction-scoped advisory lock on (kind, key); re-entrant within the transaction.
    fn lock_key(&mut self, kind: &str, key: &str) -> Result<(), StoreError> {
        self.conn.query(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))",
            &[&kind, &key],
        )?;
        Ok(())
    }

    /// Write the held-back record writes and inbox outcomes, all in one statement (data-modifying
    /// CTEs over arrays; the four touch disjoint rows).
    fn flush_held(&mut self) -> Result<(), StoreError> {
        if self.held.is_empty() && self.held_outcomes.is_empty() {
            return Ok(());
        }
        #[derive(Default)]
        struct Rows<'a> {
            kinds: Vec<&'a str>,
            keys: Vec<&'a str>,
            docs: Vec<&'a str>,
            hashes: Vec<&'a str>,
            occurred: Vec<Option<i64>>,
            changed_at: Vec<i64>,
            changed_by: Vec<i64>,
            seen_at: Vec<i64>,
            seen_by: Vec<i64>,
            versions: Vec<i64>,
        }
        impl<'a> Rows<'a> {
            fn push(&mut self, (kind, key): &'a RecordKey, r: &'a HeldRow) {
                self.kinds.push(kind);
                self.keys.push(key);
                self.docs.push(&r.doc);
                self.hashes.push(&r.hash);
                self.occurred.push(r.occurred_at);
                self.changed_at.push(r.changed_at);
                self.changed_by.push(r.changed_by);
                self.seen_at.push(r.seen_at);
                self.seen_by.push(r.seen_by);
                self.versions.push(r.version);
            }
        }
        let (mut created, mut updated) = (Rows::default(), Rows::default());
        let (mut t_kinds, mut t_keys) = (Vec::<&str>::new(), Vec::<&str>::new());
        let (mut t_seen_at, mut t_seen_by, mut t_occurred) = (vec![], vec![], vec![]);
        for (k, held) in &self.held {
            match held {
                Held::Put(row) => {
                    if self.known.get(k).is_some_and(|known| known.stored) {
                        updated.push(k, row);
                    } else {
                        created.push(k, row);
                    }
                }
                Held::Touch {
                    seen_at,
                    seen_by,
                    occurred_at,
                } => {
                    t_kinds.push(&k.0);
                    t_keys.push(&k.1);
                    t_seen_at.push(*seen_at);
                    t_seen_by.push(*seen_by);
                    t_occurred.push(*occurred_at);
                }
            }
        }
        // One outcome per inbox row: the last.
        let mut outcomes: HashMap<i64, &str> = HashMap::new();
        for (id, outcome) in &self.held_outcomes {
            outcomes.insert(*id, outcome);
        }
        let (o_ids, o_outcomes): (Vec<i64>, Vec<&str>) = outcomes.into_iter().unzip();
        let row = self
            .conn
            .query_opt(
                "WITH created AS (
                   INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                                        $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[])
                   ON CONFLICT (kind, key) DO NOTHING
                   RETURNING 1
                 ), updated AS (
                   INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
                   SELECT * FROM unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::int8[],
                                        $16::int8[], $17::int8[], $18::int8[], $19::int8[], $20::int8[])
                   ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc, hash = excluded.hash,
                     occurred_at = excluded.occurred_at, changed_at = excluded.changed_at,
                     changed_by = excluded.changed_by, seen_at = excluded.seen_at,
                     seen_by = excluded.seen_by, version = excluded.version
                   RETURNING 1
                 ), touched AS (
                   UPDATE records r SET seen_at = t.seen_at, seen_by = t.seen_by, occurred_at = t.occurred_at
                   FROM unnest($21::text[], $22::text[], $23::int8[], $24::int8[], $25::int8[])
                        AS t(kind, key, seen_at, seen_by, occurred_at)
                   WHERE r.kind = t.kind AND r.key = t.key
                   RETURNING 1
                 ), outcomes AS (
                   UPDATE inbox i SET outcome = o.outcome
                   FROM unnest($26::int8[], $27::text[]) AS o(id, outcome)
                   WHERE i.id = o.id
                   RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM created), (SELECT count(*) FROM updated),
                        (SELECT count(*) FROM touched), (SELECT count(*) FROM outcomes)",
                &[
                    &created.kinds, &created.keys, &created.docs, &created.hashes,
                    &created.occurred, &created.changed_at, &created.changed_by,
                    &created.seen_at, &created.seen_by, &created.versions,
                    &updated.kinds, &updated.keys, &updated.docs, &updated.hashes,
                    &updated.occurred, &updated.changed_at, &updated.changed_by,
                    &updated.seen_at, &updated.seen_by, &updated.versions,
                    &t_kinds, &t_keys, &t_seen_at, &t_seen_by, &t_occurred,
                    &o_ids, &o_outcomes,
                ],
            )?
            .ok_or_else(|| StoreError::Failed("no row from the flush".into()))?;
        let inserted: i64 = row.try_get(0)?;
        if inserted != created.kinds.len() as i64 {
            // A record appeared although this transaction holds its lock and read it absent:
            // a writer that did not lock it first. As in `put_record_row`: a lost race.
            return Err(StoreError::Conflict(format!(
                "{} of {} records were created concurrently",
                created.kinds.len() as i64 - inserted,
                created.kinds.len()
            )));
        }
        drop(created);
        drop(updated);
        for (k, held) in std::mem::take(&mut self.held) {
            if let (Held::Put(_), Some(known)) = (held, self.known.get_mut(&k)) {
                known.stored = true;
            }
        }
        self.held_outcomes.clear();
        Ok(())
    }
}

impl StoreTx for Tx<'_> {
    fn insert_inbox(&mut self, e: &InboxEntry<'_>) -> Result<InboxInsert, StoreError> {
        let meta = e.meta;
        let inserted = self.conn.query_opt(
            "INSERT INTO inbox (source, kind, entity, dedupe_key, occurred_at, received_at, meta, raw)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
            &[&e.source, &e.kind, &e.entity, &e.dedupe_key, &e.occurred_at, &e.received_at, &meta, &e.raw],
        )?;
        if let Some(row) = inserted {
            return Ok(InboxInsert::New(row.try_get(0)?));
        }
        let row = self
            .conn
            .query_opt(
                "SELECT id FROM inbox WHERE dedupe_key = $1",
                &[&e.dedupe_key],
            )?
            .ok_or_else(|| StoreError::Conflict("dedupe key vanished".into()))?;
        Ok(InboxInsert::Duplicate(row.try_get(0)?))
    }

    /// One `INSERT … SELECT FROM unnest(…)` for the first occurrence of each key in the batch
    /// (`ON CONFLICT DO NOTHING` waits for another transaction inserting the same key, as a
    /// single insert does), then one `SELECT` for the keys that were there already.
    fn insert_inbox_batch(
        &mut self,
        entries: &[InboxEntry<'_>],
    ) -> Result<Vec<InboxInsert>, StoreError> {
        if entries.len() < 2 {
            return entries.iter().map(|e| self.insert_inbox(e)).collect();
        }
        // The first occurrence of each key is inserted; a later one is its duplicate.
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
        let mut sources = Vec::with_capacity(entries.len());
        let (mut kinds, mut entities, mut keys) = (vec![], vec![], vec![]);
        let (mut occurred, mut received, mut metas, mut raws) = (vec![], vec![], vec![], vec![]);
        for (i, e) in entries.iter().enumerate() {
            if first.contains_key(e.dedupe_key) {
                continue;
            }
            first.insert(e.dedupe_key, i);
            sources.push(e.source);
            kinds.push(e.kind);
            entities.push(e.entity);
            keys.push(e.dedupe_key);
            occurred.push(e.occurred_at);
            received.push(e.received_at);
            metas.push(e.meta);
            raws.push(e.raw);
        }
        let mut answers: HashMap<String, InboxInsert> = HashMap::with_capacity(keys.len());
        for row in self.conn.query(
            "INSERT INTO inbox (source, kind, entity, dedupe_key, occurred_at, received_at, meta, raw)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                                  $6::int8[], $7::text[], $8::bytea[])
             ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, dedupe_key",
            &[&sources, &kinds, &entities, &keys, &occurred, &received, &metas, &raws],
        )? {
            answers.insert(row.try_get(1)?, InboxInsert::New(row.try_get(0)?));
        }
        if answers.len() < keys.len() {
            let seen: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| !answers.contains_key(*k))
                .collect();
            for row in self.conn.query(
                "SELECT id, dedupe_key FROM inbox WHERE dedupe_key = ANY($1::text[])",
                &[&seen],
            )? {
                answers.insert(row.try_get(1)?, InboxInsert::Duplicate(row.try_get(0)?));
            }
        }
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| match answers.get(e.dedupe_key) {
                Some(&answer) if first.get(e.dedupe_key) == Some(&i) => Ok(answer),
                Some(InboxInsert::New(id) | InboxInsert::Duplicate(id)) => {
                    Ok(InboxInsert::Duplicate(*id))
                }
                None => Err(StoreError::Conflict("dedupe key vanished".into())),
            })
            .collect()
    }

    /// Two statements for the whole batch: the advisory locks of every key, in the order of
    /// their lock ids (two instances locking overlapping sets cannot deadlock on them; volatile
    /// functions in the select list run after the sort); then, in a statement of its own (its
    /// snapshot must postdate the lock waits), the heads of those records. Afterwards
    /// `get_record_head` answers them from memory, and their writes and the inbox outcomes are
    /// held back until `flush`.
    fn prefetch_records(&mut self, keys: &[(&str, &str)]) -> Result<(), StoreError> {
        self.batching = true;
        let mut seen = HashSet::with_capacity(keys.len());
        let (mut kinds, mut names) = (vec![], vec![]);
        for &(kind, key) in keys {
            if seen.insert((kind, key)) && !self.known.contains_key(&record_key(kind, key)) {
                kinds.push(kind);
                names.push(key);
            }
        }
        if kinds.is_empty() {
            return Ok(());
        }
        self.conn.query(
            "SELECT pg_advisory_xact_lock(h)
             FROM (SELECT hashtextextended(k || chr(31) || key, 0) AS h
                   FROM unnest($1::text[], $2::text[]) AS u(k, key)) ids
             ORDER BY h",
            &[&kinds, &names],
        )?;
        let rows = self.conn.query(
            "SELECT r.kind, r.key, r.hash, r.occurred_at, r.version
             FROM unnest($1::text[], $2::text[]) AS u(kind, key)
             JOIN records r ON r.kind = u.kind AND r.key = u.key",
            &[&kinds, &names],
        )?;
        for (kind, key) in kinds.iter().zip(&names) {
            self.known.insert(
                record_key(kind, key),
                Known {
                    head: None,
                    stored: false,
                },
            );
        }
        for row in rows {
            let k: RecordKey = (row.try_get(0)?, row.try_get(1)?);
            self.known.insert(
                k,
                Known {
                    head: Some(RecordHead {
                        hash: row.try_get(2)?,
                        occurred_at: row.try_get(3)?,
                        version: row.try_get(4)?,
                    }),
                    stored: true,
                },
            );
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.flush_held()
    }

    fn set_inbox_outcome(&mut self, id: i64, outcome: &str) -> Result<(), StoreError> {
        if outcome == "applied" {
            return Ok(());
        }
        if self.batching {
            self.held_outcomes.push((id, outcome.to_owned()));
            return Ok(());
        }
        self.conn.execute(
            "UPDATE inbox SET outcome = $2 WHERE id = $1",
            &[&id, &outcome],
        )?;
        Ok(())
    }

    /// Locks (kind, key) for the rest of the transaction before reading it, so concurrent
    /// read-modify-writes of one entity from several instances serialise — including for an
    /// entity that does not exist yet, which a row lock could not cover (a projection may read
    /// a key twice in one transaction and must see the same answer both times). The lock is its
    /// own statement: under READ COMMITTED a statement's snapshot is taken when it starts, so a
    /// read in the same statement as the lock wait would miss what the lock holder committed.
    fn get_record(&mut self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        let k = record_key(kind, key);
        match self.known.get(&k).map(|known| known.head.is_some()) {
            // Not locked yet: lock, then read in a statement of its own.
            None => self.lock_key(kind, key)?,
            // Locked and read ahead: no such record (a put would have made a head).
            Some(false) => return Ok(None),
            Some(true) => {
                if let Some(Held::Put(r)) = self.held.get(&k) {
                    // What this transaction wrote last.
                    return Ok(Some(Record {
                        kind: k.0,
                        key: k.1,
                        doc: from_json(&r.doc),
                        hash: r.hash.clone(),
                        occurred_at: r.occurred_at,
                        changed_at: r.changed_at,
                        changed_by: r.changed_by,
                        seen_at: r.seen_at,
                        seen_by: r.seen_by,
                        version: r.version,
                    }));
                }
                // The statement must see a held-back touch.
                self.flush_held()?;
            }
        }
        self.conn
            .query_opt(
                "SELECT kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version
                 FROM records WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )?
            .map(|r| read_record(&r))
            .transpose()
    }

    /// Locks (kind, key) first, like `get_record`: change detection writes the version it read
    /// plus one, so without the lock two instances lose a change (and the staleness guard).
    fn get_record_head(&mut self, kind: &str, key: &str) -> Result<Option<RecordHead>, StoreError> {
        if let Some(known) = self.known.get(&record_key(kind, key)) {
            return Ok(known.head.clone());
        }
        self.lock_key(kind, key)?;
        self.conn
            .query_opt(
                "SELECT hash, occurred_at, version FROM records WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )?
            .map(|r| {
                Ok(RecordHead {
                    hash: r.try_get(0)?,
                    occurred_at: r.try_get(1)?,
                    version: r.try_get(2)?,
                })
            })
            .transpose()
    }

    /// Version 1 is a creation: insert-only, so a record that appeared meanwhile (a writer that
    /// did not read it first) is a `Conflict` rather than silently overwritten. Later versions
    /// replace a row this transaction locked when it read it.
    fn put_record_row(&mut self, r: &RecordRow<'_>) -> Result<(), StoreError> {
        let k = record_key(r.kind, r.key);
        if let Some(known) = self.known.get_mut(&k) {
            if r.version == 1 && known.head.is_some() {
                return Err(StoreError::Conflict(format!(
                    "record {}/{} was created concurrently",
                    r.kind, r.key
                )));
            }
            known.head = Some(RecordHead {
                hash: r.hash.to_owned(),
                occurred_at: r.occurred_at,
                version: r.version,
            });
            self.held.insert(
                k,
                Held::Put(HeldRow {
                    doc: r.doc_json.to_owned(),
                    hash: r.hash.to_owned(),
                    occurred_at: r.occurred_at,
                    changed_at: r.changed_at,
                    changed_by: r.changed_by,
                    seen_at: r.seen_at,
                    seen_by: r.seen_by,
                    version: r.version,
                }),
            );
            return Ok(());
        }
        if r.version == 1 {
            let inserted = self.conn.execute(
                "INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (kind, key) DO NOTHING",
                &[&r.kind, &r.key, &r.doc_json, &r.hash, &r.occurred_at, &r.changed_at, &r.changed_by, &r.seen_at, &r.seen_by, &r.version],
            )?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "record {}/{} was created concurrently",
                    r.kind, r.key
                )));
            }
            return Ok(());
        }
        self.conn.execute(
            "INSERT INTO records (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc, hash = excluded.hash,
               occurred_at = excluded.occurred_at, changed_at = excluded.changed_at,
               changed_by = excluded.changed_by, seen_at = excluded.seen_at,
               seen_by = excluded.seen_by, version = excluded.version",
            &[&r.kind, &r.key, &r.doc_json, &r.hash, &r.occurred_at, &r.changed_at, &r.changed_by, &r.seen_at, &r.seen_by, &r.version],
        )?;
        Ok(())
    }

    fn touch_record(
        &mut self,
        kind: &str,
        key: &str,
        seen_at: i64,
        seen_by: i64,
        occurred_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let k = record_key(kind, key);
        if let Some(known) = self.known.get_mut(&k) {
            let Some(head) = known.head.as_mut() else {
                // Like the UPDATE: no record, nothing to touch.
                return Ok(());
            };
            head.occurred_at = occurred_at;
            match self.held.get_mut(&k) {
                Some(Held::Put(row)) => {
                    row.seen_at = seen_at;
                    row.seen_by = seen_by;
                    row.occurred_at = occurred_at;
                }
                _ => {
                    self.held.insert(
                        k,
                        Held::Touch {
                            seen_at,
                            seen_by,
                            occurred_at,
                        },
                    );
                }
            }
            return Ok(());
        }
        self.conn.execute(
            "UPDATE records SET seen_at = $3, seen_by = $4, occurred_at = $5 WHERE kind = $1 AND key = $2",
            &[&kind, &key, &seen_at, &seen_by, &occurred_at],
        )?;
        Ok(())
    }

    fn replace_links(&mut self, kind: &str, from: &str, to: &[String]) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM links WHERE kind = $1 AND from_key = $2",
            &[&kind, &from],
        )?;
        for target in to {
            self.conn.execute(
                "INSERT INTO links (kind, from_key, to_key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&kind, &from, target],
            )?;
        }
        Ok(())
    }

    fn append_history(&mut self, h: &HistoryEntry) -> Result<(), StoreError> {
        let doc = to_json(&h.doc);
        self.conn.execute(
            "INSERT INTO history (kind, key, at, inbox_id, doc) VALUES ($1, $2, $3, $4, $5)",
            &[&h.kind, &h.key, &h.at, &h.inbox_id, &doc],
        )?;
        Ok(())
    }

    /// Ids come from a sequence, so an id is not a commit position: a transaction that took a
    /// smaller id may commit after one that took a larger id, and a claimer in between would
    /// send the later change of an entity first. So the row's id is taken under a
    /// transaction-scoped advisory lock on its ordering key (in the same statement, before the
    /// sequence is read): writers of one key serialise from there to their commit, and per key,
    /// id order is commit order. (Projections already lock the record they change; this holds
    /// whatever the projection does.)
    fn insert_outbox(&mut self, r: &NewOutboxRow<'_>) -> Result<i64, StoreError> {
        let payload_id = match &self.last_payload {
            Some((text, id)) if text == r.payload => *id,
            _ => {
                let id: i64 = self
                    .conn
                    .query_opt(
                        "INSERT INTO outbox_payloads (payload) VALUES ($1) RETURNING id",
                        &[&r.payload],
                    )?
                    .ok_or_else(|| StoreError::Failed("no id from INSERT RETURNING".into()))?
                    .try_get(0)?;
                self.last_payload = Some((r.payload.to_owned(), id));
                id
            }
        };
        let row = self
            .conn
            .query_opt(
                "INSERT INTO outbox (destination, source, kind, entity, inbox_id, payload_id,
                                     coalesce, schedule, created_at, next_attempt_at, contact_key)
                 SELECT $1::text, $2::text, $3::text, $4::text, $5::bigint, $6::bigint, $7::boolean,
                        $8::text, $9::bigint, $9::bigint, $10::text
                 FROM (SELECT pg_advisory_xact_lock(hashtextextended('outbox' || chr(31) || $4::text, 0)),
                              (SELECT pg_advisory_xact_lock(hashtextextended('contact' || chr(31) || $10::text, 0))
                               WHERE $10::text IS NOT NULL)) AS ordering_lock
                 RETURNING id",
                &[
                    &r.destination,
                    &r.source,
                    &r.kind,
                    &r.entity,
                    &r.inbox_id,
                    &payload_id,
                    &r.coalesce,
                    &r.schedule,
                    &r.created_at,
                    &r.contact_key,
                ],
            )?
            .ok_or_else(|| StoreError::Failed("no id from INSERT RETURNING".into()))?;
        Ok(row.try_get(0)?)
    }

    // Savepoint commands use the simple-query protocol: after a failed statement the transaction
    // refuses to prepare anything, including the ROLLBACK TO that would repair it.
    //
    // Held-back writes are flushed before a savepoint, so whatever is held back while it is
    // open came after it: a rollback drops it and restores `known` as it was.
    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.flush_held()?;
        self.conn.client.batch_execute("SAVEPOINT event")?;
        self.savepoints.push(self.known.clone());
        Ok(())
    }

    fn release_savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.client.batch_execute("RELEASE SAVEPOINT event")?;
        self.savepoints.pop();
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        // A payload written since the savepoint is gone with it: never reuse its id.
        self.last_payload = None;
        self.held.clear();
        self.held_outcomes.clear();
        if let Some(known) = self.savepoints.pop() {
            self.known = known;
        }
        self.conn
            .client
            .batch_execute("ROLLBACK TO SAVEPOINT event; RELEASE SAVEPOINT event")?;
        Ok(())
    }
}

impl Store for PostgresStore {
    fn migrate(&self) -> Result<usize, StoreError> {
        // A separate connection: the session lock must not outlive this call on a shared one.
        let mut conn = self.connector.connect()?;
        let client = &mut conn.client;
        // Migrations may rewrite large tables: no statement timeout for them.
        client.batch_execute("SET statement_timeout = 0")?;
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
        let result = (|| -> Result<usize, StoreError> {
            client.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )?;
            let current: i64 = client
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )?
                .try_get(0)?;
            let mut applied = 0;
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i64 + 1;
                if version <= current {
                    continue;
                }
                let mut tx = client.transaction()?;
                tx.batch_execute(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&version, &crate::clock::now_ms()],
                )?;
                tx.commit()?;
                applied += 1;
            }
            Ok(applied)
        })();
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        result
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn StoreTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.with_writer(|conn| {
            conn.client.batch_execute("BEGIN")?;
            let result = {
                let mut tx = Tx::new(&mut *conn);
                f(&mut tx).and_then(|()| tx.flush_held())
            };
            match result {
                Ok(()) => conn.client.batch_execute("COMMIT").map_err(|e| {
                    let e = StoreError::from(e);
                    match e {
                        StoreError::Conflict(_) => e,
                        other => StoreError::Unavailable(format!("commit failed: {other}")),
                    }
                }),
                Err(e) => {
                    let _ = conn.client.batch_execute("ROLLBACK");
                    Err(e)
                }
            }
        })
    }

    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Record>, StoreError> {
        self.with_reader(|c| {
            c.query_opt(
                "SELECT kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version
                 FROM records WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )?
            .map(|r| read_record(&r))
            .transpose()
        })
    }

    fn links_to(&self, kind: &str, to: &str) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            c.query(
                "SELECT from_key FROM links WHERE kind = $1 AND to_key = $2 ORDER BY from_key",
                &[&kind, &to],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
        })
    }

    fn links_from(&self, kind: &str, from: &str) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            c.query(
                "SELECT to_key FROM links WHERE kind = $1 AND from_key = $2 ORDER BY to_key",
                &[&kind, &from],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
        })
    }

    fn history(
        &self,
        kind: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let limit = limit as i64;
        self.with_reader(|c| {
            c.query(
                "SELECT kind, key, at, inbox_id, doc FROM history
                 WHERE kind = $1 AND key = $2 ORDER BY id LIMIT $3",
                &[&kind, &key, &limit],
            )?
            .iter()
            .map(read_history)
            .collect()
        })
    }

    fn history_between(
        &self,
        kind: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let limit = limit as i64;
        self.with_reader(|c| {
            c.query(
                "SELECT kind, key, at, inbox_id, doc FROM history
                 WHERE kind = $1 AND at >= $2 AND at < $3 ORDER BY at, id LIMIT $4",
                &[&kind, &from, &to, &limit],
            )?
            .iter()
            .map(read_history)
            .collect()
        })
    }

    fn inbox_event(&self, id: i64) -> Result<Option<InboxEvent>, StoreError> {
        self.with_reader(|c| {
            let Some(r) = c.query_opt(
                "SELECT id, source, kind, entity, dedupe_key, occurred_at, received_at, outcome, meta, raw
                 FROM inbox WHERE id = $1",
                &[&id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(InboxEvent {
                id: r.try_get(0)?,
                source: r.try_get(1)?,
                kind: r.try_get(2)?,
                entity: r.try_get(3)?,
                dedupe_key: r.try_get(4)?,
                occurred_at: r.try_get(5)?,
                received_at: r.try_get(6)?,
                outcome: r.try_get(7)?,
                meta: from_json(r.try_get::<_, &str>(8)?),
                raw: r.try_get(9)?,
            }))
        })
    }

    fn inbox_stats(&self, source: Option<&str>) -> Result<InboxStats, StoreError> {
        self.with_reader(|c| {
            let row = c
                .query_opt(
                    "SELECT COUNT(*), COUNT(DISTINCT dedupe_key) FROM inbox
                     WHERE $1::text IS NULL OR source = $1",
                    &[&source],
                )?
                .ok_or_else(|| StoreError::Failed("no row from COUNT".into()))?;
            Ok(InboxStats {
                events: row.try_get(0)?,
                distinct_dedupe_keys: row.try_get(1)?,
            })
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|c| {
            c.query_opt("SELECT 1", &[])?;
            Ok(())
        })
    }

    fn claim_deliveries(&self, claim: &ClaimRequest) -> Result<Vec<OutboxRow>, StoreError> {
        self.with_reader(|c| in_tx(c, |c| claim_deliveries(c, claim)))
    }

    fn record_attempts(
        &self,
        destination: &str,
        owner: &str,
        attempts: &[AttemptRecord],
    ) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        self.with_reader(|c| in_tx(c, |c| record_attempts(c, destination, owner, attempts)))
    }

    fn record_then_claim(
        &self,
        attempts: &[AttemptRecord],
        claim: &ClaimRequest,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.with_reader(|c| {
            in_tx(c, |c| {
                record_attempts(c, &claim.destination, &claim.owner, attempts)?;
                claim_deliveries(c, claim)
            })
        })
    }

    fn release_leases(&self, destination: &str, owner: &str) -> Result<usize, StoreError> {
        self.with_reader(|c| {
            let n = c.execute(
                "UPDATE outbox SET locked_until = NULL, lease_owner = NULL
                 WHERE lease_owner = $1 AND state = 'pending' AND destination = $2",
                &[&owner, &destination],
            )?;
            Ok(n as usize)
        })
    }

    fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<OutboxRow>, StoreError> {
        let state = f.state.map(DeliveryState::as_str);
        let limit = f.limit as i64;
        self.with_reader(|c| {
            c.query(
                concat!(
                    "SELECT ",
                    outbox_columns!(),
                    " FROM outbox
                     WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR destination = $2)
                       AND ($3::bigint IS NULL OR created_at >= $3) AND id > COALESCE($4::bigint, 0)
                     ORDER BY id LIMIT $5"
                ),
                &[&state, &f.destination, &f.since, &f.after_id, &limit],
            )?
            .iter()
            .map(read_outbox)
            .collect()
        })
    }

    fn delivery(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        self.with_reader(|c| {
            c.query_opt(
                concat!("SELECT ", outbox_columns!(), " FROM outbox WHERE id = $1"),
                &[&id],
            )?
            .map(|r| read_outbox(&r))
            .transpose()
        })
    }

    fn delivery_attempts(&self, outbox_id: i64) -> Result<Vec<AttemptRow>, StoreError> {
        self.with_reader(|c| {
            c.query(
                "SELECT attempt, started_at, latency_ms, outcome, status, error, response,
                        next_attempt_at
                 FROM delivery_attempts WHERE outbox_id = $1 ORDER BY id",
                &[&outbox_id],
            )?
            .iter()
            .map(|r| {
                Ok(AttemptRow {
                    attempt: r.try_get(0)?,
                    started_at: r.try_get(1)?,
                    latency_ms: r.try_get(2)?,
                    outcome: r.try_get(3)?,
                    status: r.try_get(4)?,
                    error: r.try_get(5)?,
                    response: r.try_get(6)?,
                    next_attempt_at: r.try_get(7)?,
                })
            })
            .collect()
        })
    }

    fn replay_dead(&self, r: &ReplayRequest) -> Result<ReplayOutcome, StoreError> {
        self.with_reader(|c| {
            in_tx(c, |c| {
                let rows = c.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = $3,
                            locked_until = NULL, lease_owner = NULL, finished_at = NULL,
                            replays = replays + 1
                     WHERE state = 'dead' AND ($1::text IS NULL OR destination = $1)
                       AND ($2::bigint IS NULL OR created_at >= $2)",
                    &[&r.destination, &r.since, &r.now],
                )? as i64;
                let replay_id: i64 = c
                    .query_opt(
                        "INSERT INTO delivery_replays (at, actor, destination, since, rows)
                         VALUES ($1, $2, $3, $4, $5) RETURNING id",
                        &[&r.now, &r.actor, &r.destination, &r.since, &rows],
                    )?
                    .ok_or_else(|| StoreError::Failed("no id from INSERT RETURNING".into()))?
                    .try_get(0)?;
                Ok(ReplayOutcome { replay_id, rows })
            })
        })
    }

    fn delivery_stats(&self, destination: &str) -> Result<DestinationStats, StoreError> {
        self.with_reader(|c| {
            // Literal states, so the partial indexes apply.
            let pending = c
                .query_opt(
                    "SELECT COUNT(*), MIN(created_at) FROM outbox
                     WHERE destination = $1 AND state = 'pending'",
                    &[&destination],
                )?
                .ok_or_else(|| StoreError::Failed("no row from COUNT".into()))?;
            let dead = c
                .query_opt(
                    "SELECT COUNT(*) FROM outbox WHERE destination = $1 AND state = 'dead'",
                    &[&destination],
                )?
                .ok_or_else(|| StoreError::Failed("no row from COUNT".into()))?;
            Ok(DestinationStats {
                destination: destination.to_owned(),
                pending: pending.try_get(0)?,
                oldest_pending_at: pending.try_get(1)?,
                dead: dead.try_get(0)?,
            })
        })
    }

    fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        let limit = limit as i64;
        self.with_reader(|c| {
            let row = c
                .query_opt(PURGE_FINISHED, &[&before, &limit])?
                .ok_or_else(|| StoreError::Failed("no row from the purge".into()))?;
            Ok(row.try_get::<_, i64>(0)? as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against the PostgreSQL of this machine (127.0.0.1:5432, trust; `ssl = on` with Debian's
    //! snakeoil certificate for `localhost`).

    use super::*;

    const URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

    fn options(statement_timeout: Duration, tls_ca_file: &str) -> PostgresOptions {
        PostgresOptions {
            statement_timeout,
            tls_ca_file: tls_ca_file.to_owned(),
            ..PostgresOptions::default()
        }
    }

    fn uses_tls(conn: &mut Conn) -> bool {
        conn.client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .and_then(|r| r.try_get(0))
            .unwrap_or(false)
    }

    #[test]
    fn every_session_gets_the_statement_timeout_and_a_slow_statement_is_cancelled() {
        let connector = Connector::new(URL, &options(Duration::from_millis(300), "")).unwrap();
        let mut conn = connector.connect().unwrap();
        let shown: String = conn
            .client
            .query_one("SHOW statement_timeout", &[])
            .unwrap()
            .get(0);
        assert_eq!(shown, "300ms");
        let slow = conn.client.execute("SELECT pg_sleep(2)", &[]).unwrap_err();
        assert_eq!(slow.code(), Some(&SqlState::QUERY_CANCELED), "{slow}");
        let none = Connector::new(URL, &options(Duration::ZERO, "")).unwrap();
        let shown: String = none
            .connect()
            .unwrap()
            .client
            .query_one("SHOW statement_timeout", &[])
            .unwrap()
            .get(0);
        assert_eq!(shown, "0", "0 leaves the server's default (none)");
    }

    #[test]
    fn sslmode_require_speaks_tls_and_verifies_the_servers_certificate() {
        if !std::path::Path::new(SNAKEOIL).exists() {
            eprintln!("SKIPPED: no {SNAKEOIL} (the server's certificate) on this machine");
            return;
        }
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider()
            .install_default()
            .ok();
        let tls_url = "postgres://postgres@localhost:5432/postgres?sslmode=require";
        let trusted = Connector::new(tls_url, &options(Duration::ZERO, SNAKEOIL)).unwrap();
        let mut conn = trusted.connect().unwrap();
        assert!(uses_tls(&mut conn), "the session is encrypted");

        let untrusted = Connector::new(tls_url, &options(Duration::ZERO, "")).unwrap();
        let refused = untrusted
            .connect()
            .err()
            .expect("an unknown issuer is refused");
        assert!(
            refused.message().contains("certificate"),
            "the error says why: {refused}"
        );

        let plain = Connector::new(URL, &options(Duration::ZERO, "")).unwrap();
        assert!(plain.tls.is_none(), "no sslmode: plain TCP");
        assert!(!uses_tls(&mut plain.connect().unwrap()));
    }

    #[test]
    fn the_pool_never_holds_more_than_pool_size_connections() {
        let name = format!("subgate_pool_{}", fastrand::u32(..));
        let mut admin = Client::connect(URL, NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let store = Arc::new(
            PostgresStore::open_with(
                &url,
                &PostgresOptions {
                    pool_size: 2,
                    ..PostgresOptions::default()
                },
            )
            .unwrap(),
        );
        let busy = std::sync::atomic::AtomicBool::new(true);
        let peak = std::thread::scope(|scope| {
            for _ in 0..8 {
                let store = store.clone();
                scope.spawn(move || {
                    for _ in 0..20 {
                        store
                            .with_reader(|c| Ok(c.client.execute("SELECT pg_sleep(0.01)", &[])?))
                            .unwrap();
                    }
                });
            }
            let sampler = scope.spawn(|| {
                let mut peak = 0i64;
                let mut probe = Client::connect(URL, NoTls).unwrap();
                while busy.load(std::sync::atomic::Ordering::SeqCst) {
                    let n: i64 = probe
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                            &[&name],
                        )
                        .unwrap()
                        .get(0);
                    peak = peak.max(n);
                    std::thread::sleep(Duration::from_millis(5));
                }
                peak
            });
            std::thread::sleep(Duration::from_millis(600));
            busy.store(false, std::sync::atomic::Ordering::SeqCst);
            sampler.join().unwrap()
        });
        drop(store);
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .unwrap();
        assert!(peak >= 2, "the readers ran ({peak} sessions seen)");
        assert!(
            peak <= 3,
            "the writer and at most pool_size readers: {peak}"
        );
    }
}
