//! Sources: adapters that decode one upstream's wire format into [`crate::envelope::Envelope`]s.
//!
//! - [`amqp`]: the supervised AMQP consumer every queue-based source plugs into;
//! - [`erp`]: the ERP customer and subscription snapshots;
//! - [`loymax`]: the Loymax loyalty events (members, cards, purchases).

pub mod amqp;
pub mod erp;
pub mod loymax;
