//! Configuration: the embedded `config/default.toml`, then an optional file, then
//! `SUBGATE__SECTION__KEY` environment variables. Every key is typed and validated once, here;
//! an error names the key.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::http::auth::Secret;

/// The embedded defaults: every key with its comment.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SUBGATE__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Every name must be one of `valid` (the sources or kinds the code emits): a typo in a filter
/// would otherwise silently match nothing.
fn check_names(key: &str, what: &str, names: &[String], valid: &[&str]) -> Result<(), ConfigError> {
    for name in names {
        if !valid.contains(&name.as_str()) {
            let hint = crate::sources::nearest(name, valid)
                .map(|n| format!("; did you mean {n:?}?"))
                .unwrap_or_default();
            return Err(invalid(key, format!("unknown {what} {name:?}{hint}")));
        }
    }
    Ok(())
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub http: HttpSettings,
    pub store: StoreSettings,
    pub amqp: AmqpSettings,
    pub erp: ErpSettings,
    pub loymax: LoymaxSettings,
    pub ingest: IngestSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub consent: ConsentSettings,
    pub akinon: AkinonSettings,
    pub admin: AdminSettings,
    pub listener: ListenerSettings,
    pub delivery: DeliverySettings,
    /// Where real changes are delivered (`[[destinations]]`); none by default.
    #[serde(default)]
    pub destinations: Vec<DestinationSettings>,
}

/// The delivery workers, for every destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub enabled: bool,
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub poll_interval: Duration,
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub lease: Duration,
    #[serde(
        deserialize_with = "deserialize_durations",
        serialize_with = "serialize_durations"
    )]
    pub retry_schedule: Vec<Duration>,
    pub jitter_percent: u8,
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub max_retry_after: Duration,
    /// Delivered and superseded outbox rows (with their attempts and payloads) older than this
    /// are deleted; 0 keeps them forever. Dead rows are never purged.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub retention: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    Webhook,
    Emarsys,
    Amqp,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Webhook => "webhook",
            DestinationKind::Emarsys => "emarsys",
            DestinationKind::Amqp => "amqp",
        }
    }
}

/// One `[[destinations]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSettings {
    pub name: String,
    pub kind: DestinationKind,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// webhook: the endpoint; emarsys: the API base URL; amqp: the broker (default `amqp.url`).
    #[serde(default)]
    pub url: String,
    /// webhook: one or more `whsec_…` secrets separated by spaces; emarsys: the API secret.
    #[serde(default = "empty_secret")]
    pub secret: Secret,
    /// Name of an environment variable holding `secret` (wins over `secret`).
    #[serde(default)]
    pub secret_env: String,
    /// Only events from these sources (empty: all).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Only events of these kinds (empty: all).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Delays between attempts (default `delivery.retry_schedule`).
    #[serde(
        default,
        deserialize_with = "deserialize_optional_durations",
        serialize_with = "serialize_optional_durations",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_schedule: Option<Vec<Duration>>,
    /// Requests per minute (default: emarsys 1000, others unlimited; 0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_minute: Option<u32>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Rows claimed at once (default: webhook 64, amqp 256, emarsys 1000 contacts per call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(
        default = "default_timeout",
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub timeout: Duration,
    /// amqp: the exchange events are republished to (topic, routing key = kind).
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// emarsys: authentication, field map, event ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emarsys: Option<EmarsysSettings>,
}

impl DestinationSettings {
    pub fn schedule<'a>(&'a self, delivery: &'a DeliverySettings) -> &'a [Duration] {
        self.retry_schedule
            .as_deref()
            .unwrap_or(&delivery.retry_schedule)
    }

    pub fn rate_per_minute(&self) -> u32 {
        self.rate_limit_per_minute.unwrap_or(match self.kind {
            DestinationKind::Emarsys => 1000,
            _ => 0,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch_size.unwrap_or(match self.kind {
            DestinationKind::Webhook => 64,
            DestinationKind::Amqp => 256,
            DestinationKind::Emarsys => 1000,
        })
    }

    pub fn emarsys(&self) -> EmarsysSettings {
        self.emarsys.clone().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmarsysAuth {
    /// `X-WSSE` UsernameToken digest: `user` + `secret`.
    Wsse,
    /// OAuth2 client credentials: `user` is the client id, `secret` the client secret.
    Oauth2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmarsysSettings {
    pub auth: EmarsysAuth,
    /// WSSE API user, or OAuth2 client id.
    pub user: String,
    pub token_url: String,
    /// The Emarsys field that identifies a contact (3: email).
    pub key_id: String,
    /// Contact view field → Emarsys field id.
    pub fields: BTreeMap<String, String>,
    /// Emarsys field of the marketing opt-in, and its values.
    pub opt_in_field: String,
    pub opt_in_true: String,
    pub opt_in_false: String,
    /// Contact view gender → Emarsys value.
    pub gender_values: BTreeMap<String, String>,
    /// Event kind → Emarsys external event id: such events are triggered, not upserted.
    pub event_ids: BTreeMap<String, String>,
}

impl Default for EmarsysSettings {
    fn default() -> Self {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        Self {
            auth: EmarsysAuth::Wsse,
            user: String::new(),
            token_url: "https://auth.emarsys.net/oauth2/token".into(),
            key_id: "3".into(),
            fields: map(&[
                ("first_name", "1"),
                ("last_name", "2"),
                ("email", "3"),
                ("phone", "15"),
                ("birth_date", "4"),
                ("gender", "5"),
            ]),
            opt_in_field: "31".into(),
            opt_in_true: "1".into(),
            opt_in_false: "2".into(),
            gender_values: map(&[("male", "1"), ("female", "2")]),
            event_ids: BTreeMap::new(),
        }
    }
}

impl EmarsysSettings {
    /// The contact view field that holds the key (`email` for key_id 3).
    pub fn key_field(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|(_, id)| **id == self.key_id)
            .map(|(field, _)| field.as_str())
    }
}

fn yes() -> bool {
    true
}

fn empty_secret() -> Secret {
    Secret::new("")
}

fn default_concurrency() -> usize {
    8
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_exchange() -> String {
    "subgate.events".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    pub body_limit_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub url: String,
    pub sqlite_synchronous: SqliteSynchronous,
    pub migrate_on_start: bool,
    /// PostgreSQL: pooled connections at most (reads, delivery bookkeeping), besides the
    /// ingest writer's own.
    pub pool_size: u32,
    /// PostgreSQL: how long a caller waits for a pooled connection before the store counts as
    /// unavailable.
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub pool_timeout: Duration,
    /// PostgreSQL: `statement_timeout` of every session (0 disables; migrations run without).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub statement_timeout: Duration,
    /// PostgreSQL with TLS (`sslmode=require` or `prefer` in the URL): a PEM file of CA
    /// certificates trusted besides the Mozilla roots (a private CA); empty: the roots only.
    pub tls_ca_file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    Full,
    Normal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: String,
    pub prefetch: u16,
    pub queue_type: QueueType,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    pub heartbeat_secs: u16,
    pub connection_name: String,
    pub single_active_consumer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErpSettings {
    pub customer_queue: String,
    pub subscription_queue: String,
    pub declare: bool,
    pub enabled: bool,
    /// ERP properties that carry a consent, by name → channel (`email`, `sms`, `call`,
    /// `whatsapp`, `push`, `viber`). Empty: the ERP says nothing of consent.
    #[serde(default)]
    pub consent_flags: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoymaxSettings {
    pub enabled: bool,
    pub queue: String,
    pub exchange: String,
    pub declare: bool,
    pub extra_routing_keys: Vec<String>,
    pub phone_region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    pub queue_capacity: usize,
    pub max_message_bytes: usize,
    pub store_retry_ms: u64,
    /// The longest pause between two attempts while the store cannot write.
    pub store_retry_max_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentSettings {
    pub default_region: String,
    /// Key of the one-click unsubscribe links (HMAC-SHA256); empty disables them.
    pub link_secret: Secret,
    /// Public base URL printed links start with.
    pub link_base_url: String,
}

/// The Akinon Extension Subscription Gateway endpoints (`docs/akinon.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AkinonSettings {
    pub enabled: bool,
    pub path_prefix: String,
    pub username: String,
    pub password: Secret,
    /// More accepted pairs at once, for rotation.
    pub extra_credentials: Vec<Credential>,
    pub rate_limit_per_second: f64,
    pub rate_limit_burst: u32,
    pub unsubscribed_keys: KeyStyle,
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub unsubscribed_max_range: Duration,
    pub unsubscribed_max_changes: usize,
}

impl AkinonSettings {
    /// Every accepted Basic-auth pair (pairs with an empty user or password are not accepted).
    pub fn credentials(&self) -> impl Iterator<Item = (&str, &Secret)> {
        std::iter::once((self.username.as_str(), &self.password))
            .chain(
                self.extra_credentials
                    .iter()
                    .map(|c| (c.username.as_str(), &c.password)),
            )
            .filter(|(u, p)| !u.is_empty() && !p.expose().is_empty())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
}

/// Key style of the `unsubscribed-users` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStyle {
    /// `emailUnsubscribed` (the document's table and example).
    Camel,
    /// `email_unsubscribed` (the document's TypeScript interface).
    Snake,
}

/// subgate's own admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token; empty disables the admin routes.
    pub token: Secret,
    /// Bearer token of the read API (`GET /api/v1/…`); empty leaves it open.
    pub read_token: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub timeout: Duration,
}

/// The ONAP/TMF service-order listener (`POST /externalapi/listener/v1/listener`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    pub enabled: bool,
    /// Serve the listener route on the plain `http.addr` too (false: over TLS only).
    pub plain_http: bool,
    /// One Bearer token without expiry (`SUBGATE__LISTENER__BEARER_TOKEN`); empty: none.
    pub bearer_token: Secret,
    pub bearer_tokens: Vec<BearerTokenSettings>,
    pub basic_users: Vec<BasicUserSettings>,
    /// Token bucket per credential: refill rate (0 disables limiting) and burst.
    pub rate_per_second: f64,
    pub rate_burst: u32,
    pub tls: ListenerTlsSettings,
}

impl ListenerSettings {
    /// Whether any credential is configured at all.
    pub fn has_credentials(&self) -> bool {
        !self.bearer_token.expose().is_empty()
            || !self.bearer_tokens.is_empty()
            || !self.basic_users.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BearerTokenSettings {
    pub token: Secret,
    /// After this instant the token answers 401/42 (expired credentials).
    #[serde(default, with = "instant", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicUserSettings {
    pub user: String,
    pub password: Secret,
    #[serde(default, with = "instant", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSettings {
    pub enabled: bool,
    /// Own listening address of the HTTPS server (port 0 picks a free port).
    pub addr: SocketAddr,
    /// PEM certificate chain (leaf first) and PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}

/// Where a `Settings` comes from: the defaults, an optional file, and the environment.
#[derive(Debug, Default, Clone)]
pub struct ConfigSource {
    pub file: Option<std::path::PathBuf>,
    /// `(name, value)` pairs; normally `std::env::vars()`.
    pub env: Vec<(String, String)>,
}

impl ConfigSource {
    pub fn from_process(file: Option<std::path::PathBuf>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
        }
    }
}

impl Settings {
    /// Load and validate the effective configuration.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            DEFAULT_TOML
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: "<embedded default.toml>".into(),
                    message: e.message().to_owned(),
                })?;
        if let Some(path) = &source.file {
            merge(&mut table, read_file(path)?);
        }
        apply_env(&mut table, &source.env)?;
        let mut settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                // The TOML deserializer appends "in `key`" on a second line; one line is enough.
                let message = e.into_inner().to_string();
                invalid(&key, message.lines().next().unwrap_or_default())
            })?;
        settings.resolve_secrets(&source.env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// `secret_env = "NAME"` → the variable's value becomes `secret`.
    fn resolve_secrets(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        for (i, d) in self.destinations.iter_mut().enumerate() {
            if d.secret_env.is_empty() {
                continue;
            }
            match env.iter().find(|(k, _)| *k == d.secret_env) {
                Some((_, v)) if !v.is_empty() => d.secret = Secret::new(v.clone()),
                _ => {
                    return Err(invalid(
                        &format!("destinations[{i}].secret_env"),
                        format!("environment variable {} is not set", d.secret_env),
                    ))
                }
            }
        }
        Ok(())
    }

    fn validate_delivery(&self) -> Result<(), ConfigError> {
        if self.delivery.jitter_percent > 100 {
            return Err(invalid("delivery.jitter_percent", "must be at most 100"));
        }
        if self.delivery.poll_interval.is_zero() {
            return Err(invalid("delivery.poll_interval", "must be more than 0"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            let key = |k: &str| format!("destinations[{i}].{k}");
            let name_ok = !d.name.is_empty()
                && d.name.len() <= 64
                && d.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !name_ok {
                return Err(invalid(
                    &key("name"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'",
                ));
            }
            if !names.insert(d.name.as_str()) {
                return Err(invalid(&key("name"), format!("{:?} is used twice", d.name)));
            }
            if d.concurrency == 0 || d.concurrency > 256 {
                return Err(invalid(&key("concurrency"), "must be between 1 and 256"));
            }
            if d.batch() == 0 || (d.kind == DestinationKind::Emarsys && d.batch() > 1000) {
                return Err(invalid(
                    &key("batch_size"),
                    "must be at least 1 (emarsys: at most 1000)",
                ));
            }
            if d.timeout.is_zero() || d.timeout >= self.delivery.lease {
                return Err(invalid(
                    &key("timeout"),
                    "must be more than 0 and less than delivery.lease",
                ));
            }
            check_names(
                &key("sources"),
                "source",
                &d.sources,
                crate::sources::SOURCES,
            )?;
            check_names(&key("kinds"), "kind", &d.kinds, crate::sources::KINDS)?;
            if let Some(e) = &d.emarsys {
                let kinds: Vec<String> = e.event_ids.keys().cloned().collect();
                check_names(
                    &key("emarsys.event_ids"),
                    "kind",
                    &kinds,
                    crate::sources::KINDS,
                )?;
                for (kind, id) in &e.event_ids {
                    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(invalid(
                            &key("emarsys.event_ids"),
                            format!("{kind:?}: the Emarsys event id must be a number, not {id:?}"),
                        ));
                    }
                }
            }
            if d.emarsys.is_some() && d.kind != DestinationKind::Emarsys {
                return Err(invalid(&key("emarsys"), "only for kind = \"emarsys\""));
            }
            match d.kind {
                DestinationKind::Webhook => {
                    let url_ok = (d.url.starts_with("http://") || d.url.starts_with("https://"))
                        && reqwest::Url::parse(&d.url).is_ok();
                    if !url_ok {
                        return Err(invalid(&key("url"), "must be an http:// or https:// URL"));
                    }
                    crate::delivery::webhook::parse_secrets(d.secret.expose())
                        .map_err(|m| invalid(&key("secret"), format!("{m} (or set secret_env)")))?;
                }
                DestinationKind::Emarsys => {
                    let e = d.emarsys();
                    if e.user.is_empty() || d.secret.expose().is_empty() {
                        return Err(invalid(
                            &key("emarsys.user"),
                            "emarsys needs emarsys.user and secret (or secret_env)",
                        ));
                    }
                    if e.key_field().is_none() {
                        return Err(invalid(
                            &key("emarsys.key_id"),
                            "must be one of the field ids in emarsys.fields",
                        ));
                    }
                    let url = self.destination_url(d);
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(&key("url"), "must be an http:// or https:// URL"));
                    }
                }
                DestinationKind::Amqp => {
                    crate::sources::amqp::BrokerAddress::parse(&self.destination_url(d))
                        .map_err(|m| invalid(&key("url"), m))?;
                    if d.exchange.is_empty() || d.exchange.len() > 255 {
                        return Err(invalid(
                            &key("exchange"),
                            "must be a non-empty name of at most 255 bytes",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A destination's URL with the kind's default filled in.
    pub fn destination_url(&self, d: &DestinationSettings) -> String {
        match (d.kind, d.url.is_empty()) {
            (DestinationKind::Emarsys, true) => "https://api.emarsys.net".into(),
            (DestinationKind::Amqp, true) => self.amqp.url.clone(),
            _ => d.url.clone(),
        }
    }

    /// Defaults only (tests and `config print` without a file start here).
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load(&ConfigSource::default())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        StoreUrl::parse(&self.store.url)?;
        if self.store.pool_size == 0 {
            return Err(invalid("store.pool_size", "must be at least 1"));
        }
        if self.store.pool_timeout.is_zero() {
            return Err(invalid("store.pool_timeout", "must be longer than 0"));
        }
        if !(self.amqp.url.starts_with("amqp://") || self.amqp.url.starts_with("amqps://")) {
            return Err(invalid("amqp.url", "must start with amqp:// or amqps://"));
        }
        crate::sources::amqp::BrokerAddress::parse(&self.amqp.url)
            .map_err(|m| invalid("amqp.url", m))?;
        if self.amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.amqp.reconnect_initial_ms == 0
            || self.amqp.reconnect_max_ms < self.amqp.reconnect_initial_ms
        {
            return Err(invalid(
                "amqp.reconnect_max_ms",
                "must be >= amqp.reconnect_initial_ms, which must be > 0",
            ));
        }
        if !self.amqp.dead_letter_queue.contains("{queue}") {
            return Err(invalid(
                "amqp.dead_letter_queue",
                "must contain {queue} so each source queue gets its own dead-letter queue",
            ));
        }
        for (key, value) in [
            ("erp.customer_queue", &self.erp.customer_queue),
            ("erp.subscription_queue", &self.erp.subscription_queue),
            ("amqp.dead_letter_exchange", &self.amqp.dead_letter_exchange),
            ("loymax.queue", &self.loymax.queue),
            ("loymax.exchange", &self.loymax.exchange),
        ] {
            if value.trim().is_empty() || value.len() > 255 {
                return Err(invalid(
                    key,
                    "must be a non-empty name of at most 255 bytes",
                ));
            }
        }
        if self.ingest.batch_max == 0 || self.ingest.batch_max > 100_000 {
            return Err(invalid("ingest.batch_max", "must be between 1 and 100000"));
        }
        if self.ingest.queue_capacity == 0 {
            return Err(invalid("ingest.queue_capacity", "must be at least 1"));
        }
        if self.ingest.max_message_bytes == 0 {
            return Err(invalid("ingest.max_message_bytes", "must be at least 1"));
        }
        if self.http.body_limit_bytes == 0 {
            return Err(invalid("http.body_limit_bytes", "must be at least 1"));
        }
        self.validate_listener()?;
        for (name, channel) in &self.erp.consent_flags {
            if crate::consent::Channel::parse(channel).is_none() {
                return Err(invalid(
                    "erp.consent_flags",
                    format!(
                        "{name:?} names the channel {channel:?}; channels are email, sms, call, \
                         whatsapp, push, viber"
                    ),
                ));
            }
        }
        crate::consent::Normaliser::new(&self.consent.default_region)
            .map_err(|m| invalid("consent.default_region", m))?;
        let prefix = &self.akinon.path_prefix;
        if !prefix.is_empty()
            && (!prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains(['{', '}']))
        {
            return Err(invalid(
                "akinon.path_prefix",
                "must be empty or start with / and not end with / (e.g. \"/akinon\")",
            ));
        }
        if !(self.akinon.rate_limit_per_second >= 0.0
            && self.akinon.rate_limit_per_second.is_finite())
        {
            return Err(invalid(
                "akinon.rate_limit_per_second",
                "must be >= 0 (0 disables)",
            ));
        }
        if self.akinon.unsubscribed_max_range.is_zero() {
            return Err(invalid(
                "akinon.unsubscribed_max_range",
                "must be more than 0",
            ));
        }
        if self.akinon.unsubscribed_max_changes == 0 {
            return Err(invalid(
                "akinon.unsubscribed_max_changes",
                "must be at least 1",
            ));
        }
        if !(self.consent.link_base_url.starts_with("http://")
            || self.consent.link_base_url.starts_with("https://"))
        {
            return Err(invalid(
                "consent.link_base_url",
                "must start with http:// or https://",
            ));
        }
        crate::consent::Normaliser::new(&self.loymax.phone_region)
            .map_err(|m| invalid("loymax.phone_region", m))?;
        if self
            .loymax
            .extra_routing_keys
            .iter()
            .any(|k| k.is_empty() || k.len() > 255)
        {
            return Err(invalid(
                "loymax.extra_routing_keys",
                "each routing key must be non-empty and at most 255 bytes",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        self.validate_delivery()?;
        Ok(())
    }

    fn validate_listener(&self) -> Result<(), ConfigError> {
        let l = &self.listener;
        for (i, t) in l.bearer_tokens.iter().enumerate() {
            if t.token.expose().trim().is_empty() {
                return Err(invalid(
                    &format!("listener.bearer_tokens[{i}].token"),
                    "must not be empty",
                ));
            }
        }
        for (i, u) in l.basic_users.iter().enumerate() {
            if u.user.is_empty() || u.user.contains(':') {
                return Err(invalid(
                    &format!("listener.basic_users[{i}].user"),
                    "must be a non-empty name without `:`",
                ));
            }
            if u.password.expose().is_empty() {
                return Err(invalid(
                    &format!("listener.basic_users[{i}].password"),
                    "must not be empty",
                ));
            }
        }
        if !(l.rate_per_second.is_finite() && l.rate_per_second >= 0.0) {
            return Err(invalid(
                "listener.rate_per_second",
                "must be a number >= 0 (0 disables limiting)",
            ));
        }
        if l.rate_burst == 0 {
            return Err(invalid("listener.rate_burst", "must be at least 1"));
        }
        if l.tls.enabled {
            for (key, path) in [
                ("listener.tls.cert_path", &l.tls.cert_path),
                ("listener.tls.key_path", &l.tls.key_path),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(invalid(key, "must be set when listener.tls.enabled = true"));
                }
            }
        }
        if l.enabled {
            if !l.has_credentials() {
                return Err(invalid(
                    "listener.bearer_token",
                    "listener.enabled = true needs at least one credential \
                     (bearer_token, bearer_tokens or basic_users)",
                ));
            }
            if !l.plain_http && !l.tls.enabled {
                return Err(invalid(
                    "listener.plain_http",
                    "the listener would be served nowhere: set plain_http = true or \
                     enable listener.tls",
                ));
            }
        }
        Ok(())
    }

    /// The dead-letter queue of a source queue.
    pub fn dead_letter_queue_for(&self, queue: &str) -> String {
        self.amqp.dead_letter_queue.replace("{queue}", queue)
    }

    /// The effective configuration as TOML with every secret replaced by `***`.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.amqp.url = redact_url(&copy.amqp.url);
        copy.store.url = redact_url(&copy.store.url);
        copy.akinon.password = copy.akinon.password.redacted();
        for c in &mut copy.akinon.extra_credentials {
            c.password = c.password.redacted();
        }
        copy.admin.token = copy.admin.token.redacted();
        copy.admin.read_token = copy.admin.read_token.redacted();
        copy.consent.link_secret = copy.consent.link_secret.redacted();
        copy.listener.bearer_token = copy.listener.bearer_token.redacted();
        for t in &mut copy.listener.bearer_tokens {
            t.token = t.token.redacted();
        }
        for u in &mut copy.listener.basic_users {
            u.password = u.password.redacted();
        }
        for d in &mut copy.destinations {
            d.secret = d.secret.redacted();
            d.url = redact_url(&d.url);
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Replace the password of `scheme://user:password@host…` with `***` (IPv6 hosts, escapes and
/// all, through the `url` crate); a URL that does not parse is hidden whole if it could hold one.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            // Cannot fail: a URL with a password has a host.
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(_) => text.to_owned(),
        Err(_) if text.contains('@') => "***".to_owned(),
        Err(_) => text.to_owned(),
    }
}

/// The parsed `store.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(invalid("store.url", "sqlite:// needs a file path"));
            }
            Ok(StoreUrl::Sqlite(path.into()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(url.to_owned()))
        } else {
            Err(invalid(
                "store.url",
                format!(
                    "unsupported scheme in {:?}: use sqlite://PATH or postgres://…",
                    redact_url(url)
                ),
            ))
        }
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    text.parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.display().to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })
}

/// Deep-merge `overlay` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `SUBGATE__AMQP__PREFETCH=512` sets `amqp.prefetch`. Values are read as TOML literals
/// (numbers, booleans, arrays) when they parse as one, otherwise as strings.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var: name.clone(),
                message: "empty key segment (use SUBGATE__SECTION__KEY)".into(),
            });
        }
        let mut cursor = &mut *table;
        let (last, parents) = keys.split_last().ok_or_else(|| ConfigError::Env {
            var: name.clone(),
            message: "no key".into(),
        })?;
        for key in parents {
            let entry = cursor
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var: name.clone(),
                        message: format!("`{key}` is not a section"),
                    })
                }
            };
        }
        // A key whose default is a string stays a string (a password "0123" is not a number).
        let value = match cursor.get(last) {
            Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
            _ => parse_env_value(raw),
        };
        cursor.insert(last.clone(), value);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let trimmed = raw.trim();
    let literal = trimmed == "true"
        || trimmed == "false"
        || trimmed.starts_with('[')
        || trimmed.starts_with('{')
        || trimmed.parse::<i64>().is_ok()
        || (trimmed.parse::<f64>().is_ok() && trimmed.contains('.'));
    // Exactly one value: `[1]\n[amqp]\nprefetch = 0` is not the array `[1]` with the rest
    // dropped; it stays a string (and the key's type check names the key).
    if literal {
        if let Ok(v) = trimmed.parse::<toml::Value>() {
            return v;
        }
    }
    toml::Value::String(raw.to_owned())
}

/// Parse "500ms", "20s", "2m", "1h" (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 20s, 2m, 1h or 7d"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    Ok(Duration::from_millis(ms))
}

pub fn format_duration(d: &Duration) -> String {
    let ms = d.as_millis();
    if ms % 86_400_000 == 0 && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

pub fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
    }
}

pub fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(d))
}

/// An optional instant written as a quoted RFC 3339 string ("2030-01-01T00:00:00Z").
mod instant {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            DateTime::parse_from_rfc3339(t.trim())
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not an RFC 3339 instant like \"2030-01-01T00:00:00Z\": {e}"
                    ))
                })
        })
        .transpose()
    }

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            None => s.serialize_none(),
        }
    }
}

/// A list of durations: `["5s", "30s", "2m"]`.
pub fn deserialize_durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_duration(t).map_err(serde::de::Error::custom))
        .collect()
}

pub fn serialize_durations<S: serde::Serializer>(
    list: &[Duration],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(list.iter().map(format_duration))
}

fn deserialize_optional_durations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Duration>>, D::Error> {
    deserialize_durations(d).map(Some)
}

fn serialize_optional_durations<S: serde::Serializer>(
    list: &Option<Vec<Duration>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match list {
        Some(l) => serialize_durations(l, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!("subgate-cfg-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = file.map(|text| {
            let p = dir.join("c.toml");
            std::fs::write(&p, text).unwrap();
            p
        });
        Settings::load(&ConfigSource {
            file: path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.http.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.store.url, "sqlite://subgate.db");
        assert_eq!(s.amqp.prefetch, 256);
        assert_eq!(s.erp.customer_queue, "secom-customer-queue");
        assert_eq!(s.erp.subscription_queue, "secom-subscriptions-queue");
        assert_eq!(s.amqp.queue_type, QueueType::Quorum);
        assert_eq!(s.shutdown.timeout, Duration::from_secs(20));
        assert_eq!(s.dead_letter_queue_for("q"), "q.dead");
        assert!(!s.loymax.enabled);
        assert_eq!(s.loymax.queue, "smc.customerEvents");
        assert_eq!(s.loymax.exchange, "loymax.events");
        assert_eq!(s.loymax.phone_region, "RU");
    }

    #[test]
    fn an_env_value_with_text_after_its_literal_is_rejected_not_cut_short() {
        let err = load(
            None,
            &[(
                "SUBGATE__ERP__CONSENT_FLAGS",
                "{ emailPermission = \"email\" }\nSMS_PERMISSION = \"sms\"",
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("erp.consent_flags"), "{err}");
        let err = load(
            None,
            &[(
                "SUBGATE__LOYMAX__EXTRA_ROUTING_KEYS",
                "[\"a.b\"]\n[amqp]\nprefetch = 0",
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("loymax.extra_routing_keys"), "{err}");
        let s = load(
            None,
            &[
                (
                    "SUBGATE__ERP__CONSENT_FLAGS",
                    " { emailPermission = \"email\" } ",
                ),
                ("SUBGATE__LOYMAX__EXTRA_ROUTING_KEYS", "[\"a.b\", \"c\"]"),
                ("SUBGATE__AKINON__RATE_LIMIT_PER_SECOND", "2.5"),
                ("SUBGATE__AMQP__PREFETCH", " 512 "),
            ],
        )
        .unwrap();
        assert_eq!(s.erp.consent_flags.len(), 1);
        assert_eq!(s.loymax.extra_routing_keys, ["a.b", "c"]);
        assert_eq!(s.akinon.rate_limit_per_second, 2.5);
        assert_eq!(s.amqp.prefetch, 512);
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        let s = load(
            Some("[amqp]\nprefetch = 100\n[http]\naddr = \"0.0.0.0:9000\"\n"),
            &[("SUBGATE__AMQP__PREFETCH", "512"), ("OTHER", "x")],
        )
        .unwrap();
        assert_eq!(s.amqp.prefetch, 512);
        assert_eq!(s.http.addr.to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err = load(None, &[("SUBGATE__AMQP__PREFETCH", "lots")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.prefetch"), "{err}");
        let err = load(Some("[log]\nformat = \"xml\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.format"), "{err}");
        let err = load(None, &[("SUBGATE__STORE__URL", "mysql://x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.url"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = load(Some("[amqp]\nprefech = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefech"), "{err}");
    }

    #[test]
    fn redacted_print_hides_the_broker_password() {
        let s = load(
            None,
            &[("SUBGATE__AMQP__URL", "amqp://user:s3cret@host:5672/%2f")],
        )
        .unwrap();
        let printed = s.redacted_toml();
        assert!(!printed.contains("s3cret"));
        assert!(printed.contains("amqp://user:***@host:5672/%2f"));
    }

    const WEBHOOK: &str = r#"[[destinations]]
name = "crm"
kind = "webhook"
url = "https://user:pw@crm.example.com/hooks"
secret = "whsec_c2VjcmV0LW9uZQ=="
retry_schedule = ["1s", "2m"]

[[destinations]]
name = "emarsys"
kind = "emarsys"
secret_env = "EMARSYS_SECRET"
[destinations.emarsys]
user = "company001"
event_ids = { "order.changed" = "77" }
"#;

    #[test]
    fn unknown_sources_kinds_and_event_ids_in_filters_name_the_key_and_the_nearest_name() {
        let destination = |extra: &str| {
            format!(
                "[[destinations]]\nname = \"crm\"\nkind = \"webhook\"\nurl = \"https://crm.example.com/h\"\nsecret = \"whsec_c2VjcmV0LW9uZQ==\"\n{extra}"
            )
        };
        let err = |extra: &str| {
            load(Some(&destination(extra)), &[])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("sources = [\"erp\", \"akinn\"]\n"),
            "config key `destinations[0].sources`: unknown source \"akinn\"; did you mean \"akinon\"?"
        );
        assert_eq!(
            err("kinds = [\"customer.change\"]\n"),
            "config key `destinations[0].kinds`: unknown kind \"customer.change\"; did you mean \"customer.changed\"?"
        );
        let emarsys = "[[destinations]]\nname = \"em\"\nkind = \"emarsys\"\nsecret = \"s\"\n[destinations.emarsys]\nuser = \"u\"\n";
        let e = load(
            Some(&format!(
                "{emarsys}event_ids = {{ \"order.created\" = \"7\" }}\n"
            )),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "config key `destinations[0].emarsys.event_ids`: unknown kind \"order.created\"; did you mean \"order.changed\"?"
        );
        let e = load(
            Some(&format!(
                "{emarsys}event_ids = {{ \"order.changed\" = \"x7\" }}\n"
            )),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("destinations[0].emarsys.event_ids"), "{e}");
        // Every emitted name is accepted.
        let all = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ok = destination(&format!(
            "sources = [{}]\nkinds = [{}]\n",
            all(crate::sources::SOURCES),
            all(crate::sources::KINDS)
        ));
        load(Some(&ok), &[]).unwrap();
    }

    #[test]
    fn destinations_load_with_defaults_and_secret_env() {
        let s = load(Some(WEBHOOK), &[("EMARSYS_SECRET", "em-s3cret")]).unwrap();
        let [crm, em] = s.destinations.as_slice() else {
            panic!("two destinations")
        };
        assert_eq!(crm.kind, DestinationKind::Webhook);
        assert_eq!(
            crm.schedule(&s.delivery),
            &[Duration::from_secs(1), Duration::from_secs(120)]
        );
        assert_eq!((crm.concurrency, crm.timeout), (8, Duration::from_secs(10)));
        assert_eq!(crm.rate_per_minute(), 0);
        assert_eq!(em.secret.expose(), "em-s3cret");
        assert_eq!(em.rate_per_minute(), 1000);
        assert_eq!(em.batch(), 1000);
        assert_eq!(em.schedule(&s.delivery).len(), 10);
        let e = em.emarsys();
        assert_eq!((e.key_id.as_str(), e.key_field()), ("3", Some("email")));
        assert_eq!(e.event_ids["order.changed"], "77");
        assert_eq!(s.destination_url(em), "https://api.emarsys.net");
    }

    #[test]
    fn destinations_can_come_from_one_environment_variable() {
        let s = load(
            None,
            &[(
                "SUBGATE__DESTINATIONS",
                r#"[{name="bus", kind="amqp", retry_schedule=["0s"]}]"#,
            )],
        )
        .unwrap();
        assert_eq!(s.destinations[0].exchange, "subgate.events");
        assert_eq!(s.destination_url(&s.destinations[0]), s.amqp.url);
    }

    #[test]
    fn destination_errors_name_the_key() {
        let cases = [
            (WEBHOOK, vec![], "destinations[1].secret_env"),
            (
                "[[destinations]]\nname = \"a\"\nkind = \"webhook\"\nurl = \"ftp://x\"\n",
                vec![],
                "destinations[0].url",
            ),
            (
                "[[destinations]]\nname = \"a\"\nkind = \"webhook\"\nurl = \"http://[x\"\n",
                vec![],
                "destinations[0].url",
            ),
            (
                "[[destinations]]\nname = \"a\"\nkind = \"webhook\"\nurl = \"http://x\"\n",
                vec![],
                "destinations[0].secret",
            ),
            (
                "[[destinations]]\nname = \"a b\"\nkind = \"amqp\"\n",
                vec![],
                "destinations[0].name",
            ),
            (
                "[[destinations]]\nname = \"a\"\nkind = \"amqp\"\ncolour = 1\n",
                vec![],
                "colour",
            ),
            (
                "[[destinations]]\nname = \"a\"\nkind = \"amqp\"\ntimeout = \"5m\"\n",
                vec![],
                "destinations[0].timeout",
            ),
        ];
        for (file, env, key) in cases {
            let err = load(Some(file), &env).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn redacted_print_hides_destination_secrets_and_the_admin_token() {
        let s = load(
            Some(WEBHOOK),
            &[
                ("EMARSYS_SECRET", "em-s3cret"),
                ("SUBGATE__ADMIN__TOKEN", "adm1n-t0ken"),
            ],
        )
        .unwrap();
        let printed = s.redacted_toml();
        for secret in ["c2VjcmV0LW9uZQ", "em-s3cret", "adm1n-t0ken", ":pw@"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(printed.contains("[[destinations]]"), "{printed}");
        assert!(printed.contains("secret = \"***\""), "{printed}");
        // The printed configuration loads back (apart from the redacted values).
        assert!(printed.parse::<toml::Table>().is_ok());
    }

    #[test]
    fn redacted_print_hides_every_secret() {
        let s = load(
            Some("[[akinon.extra_credentials]]\nusername = \"old\"\npassword = \"rotated-pw\"\n"),
            &[
                ("SUBGATE__AKINON__USERNAME", "akinon"),
                ("SUBGATE__AKINON__PASSWORD", "0123"),
                ("SUBGATE__ADMIN__TOKEN", "admin-tok"),
                ("SUBGATE__ADMIN__READ_TOKEN", "read-tok"),
                ("SUBGATE__CONSENT__LINK_SECRET", "link-key"),
            ],
        )
        .unwrap();
        // A numeric-looking secret from the environment stays the text it was.
        assert_eq!(s.akinon.password.expose(), "0123");
        assert_eq!(s.akinon.credentials().count(), 2);
        let printed = s.redacted_toml();
        for secret in ["0123", "rotated-pw", "admin-tok", "read-tok", "link-key"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("akinon"));
    }

    #[test]
    fn akinon_prefix_must_be_a_clean_path() {
        for bad in ["akinon", "/akinon/", "/{x}"] {
            let err = load(None, &[("SUBGATE__AKINON__PATH_PREFIX", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("akinon.path_prefix"), "{err}");
        }
        assert!(load(None, &[("SUBGATE__AKINON__PATH_PREFIX", "/ext/akinon")]).is_ok());
    }

    #[test]
    fn listener_credentials_load_from_the_environment_and_never_print() {
        let s = load(
            None,
            &[
                ("SUBGATE__LISTENER__ENABLED", "true"),
                ("SUBGATE__LISTENER__BEARER_TOKEN", "tok-s3cret"),
                (
                    "SUBGATE__LISTENER__BEARER_TOKENS",
                    r#"[{ token = "tok2-s3cret", expires_at = "2030-01-01T00:00:00Z" }]"#,
                ),
                (
                    "SUBGATE__LISTENER__BASIC_USERS",
                    r#"[{ user = "hub", password = "pw-s3cret" }]"#,
                ),
            ],
        )
        .unwrap();
        assert_eq!(s.listener.bearer_token.expose(), "tok-s3cret");
        assert_eq!(
            s.listener.bearer_tokens[0]
                .expires_at
                .map(|t| t.timestamp()),
            Some(1_893_456_000)
        );
        assert_eq!(s.listener.basic_users[0].user, "hub");
        let printed = s.redacted_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("expires_at = \"2030-01-01T00:00:00Z\""),
            "{printed}"
        );
        assert!(printed.contains("user = \"hub\""), "{printed}");
    }

    #[test]
    fn listener_settings_are_validated_with_the_key_named() {
        let err = load(None, &[("SUBGATE__LISTENER__ENABLED", "true")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener.bearer_token"), "{err}");
        let err = load(
            None,
            &[(
                "SUBGATE__LISTENER__BEARER_TOKENS",
                r#"[{ token = "t", expires_at = "next year" }]"#,
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listener.bearer_tokens[0].expires_at"),
            "{err}"
        );
        let err = load(
            None,
            &[
                ("SUBGATE__LISTENER__ENABLED", "true"),
                ("SUBGATE__LISTENER__BEARER_TOKEN", "t"),
                ("SUBGATE__LISTENER__PLAIN_HTTP", "false"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listener.plain_http"), "{err}");
        let err = load(None, &[("SUBGATE__LISTENER__TLS__ENABLED", "true")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener.tls.cert_path"), "{err}");
    }

    #[test]
    fn durations_parse_in_common_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(format_duration(&Duration::from_secs(7 * 86_400)), "7d");
        assert!(parse_duration("soon").is_err());
    }
}
