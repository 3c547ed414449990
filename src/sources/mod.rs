//! Sources: adapters that decode one upstream's wire format into [`crate::envelope::Envelope`]s.
//!
//! - [`amqp`]: the supervised AMQP consumer every queue-based source plugs into;
//! - [`erp`]: the ERP customer and subscription snapshots;
//! - [`listener`]: the ONAP/TMF service-order notifications (HTTP; the route is in
//!   `crate::http::listener`).

pub mod amqp;
pub mod erp;
pub mod listener;
