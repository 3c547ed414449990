//! subgate: a customer-event and subscription gateway.
//!
//! Data flows one way (see `DESIGN.md`):
//! - [`sources`]: adapters that decode one upstream's wire format into [`envelope::Envelope`]s
//!   ([`sources::amqp`] is the supervised consumer every queue-based source plugs into);
//! - [`ingest`]: the one writer path; group commit of inbox insert → dedupe → projection;
//! - [`consent`]: the consent ledger shared by every source;
//! - [`projection`]: shared building blocks of projections (change detection, staleness);
//! - [`store`]: the `Store` trait and its backends (SQLite now);
//! - [`dead_letters`]: list inbound dead-letter queues and replay their messages;
//! - [`delivery`]: the outbox's workers: webhooks, Emarsys, AMQP republish, retries, replay;
//! - [`http`]: the router: ops routes, the read API, HTTP sources (and HTTPS via rustls);
//! - [`config`], [`cli`], [`startup`], [`telemetry`], [`health`], [`clock`]: running it.
#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod confirms;
pub mod consent;
pub mod dead_letters;
pub mod delivery;
pub mod envelope;
pub mod health;
pub mod http;
pub mod ingest;
pub mod openapi;
pub mod projection;
pub mod rate_limit;
pub mod sources;
pub mod startup;
pub mod store;
pub mod telemetry;
