//! Sources: adapters that decode one upstream's wire format into [`crate::envelope::Envelope`]s.
//!
//! - [`amqp`]: the supervised AMQP consumer every queue-based source plugs into;
//! - [`erp`]: the ERP customer and subscription snapshots;
//! - [`akinon`]: the Akinon Extension Subscription Gateway calls (HTTP: [`crate::http::akinon`]);
//! - [`consents`]: opt-outs from outside Akinon (admin reports, one-click unsubscribe links).
//! - [`loymax`]: the Loymax loyalty events (members, cards, purchases).
//! - [`listener`]: the ONAP/TMF service-order notifications (HTTP; the route is in
//!   `crate::http::listener`).

pub mod akinon;
pub mod amqp;
pub mod consents;
pub mod erp;
pub mod listener;
pub mod loymax;
