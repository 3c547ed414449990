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

/// Every envelope source the code emits: what a destination's `sources` filter may name.
pub const SOURCES: &[&str] = &[
    erp::SOURCE,
    akinon::SOURCE,
    consents::ADMIN_SOURCE,
    consents::LINK_SOURCE,
    loymax::SOURCE,
    listener::SOURCE,
];

/// Every event kind the sources emit: what a destination's `kinds` filter and an Emarsys
/// destination's `event_ids` may name.
pub const KINDS: &[&str] = &[
    // erp
    "customer.changed",
    "subscription.changed",
    // akinon
    "user.changed",
    "order.changed",
    "email.subscribed",
    // consents (admin API, one-click links)
    "consent.opted_in",
    "consent.opted_out",
    // loymax
    "registration.started",
    "registration.completed",
    "card.replaced",
    "card.linked",
    "member.merged",
    "card.activated",
    "card.blocked",
    "card.unblocked",
    "card.deleted",
    "card.restored",
    "card.category_changed",
    "member.attribute_updated",
    "member.subscription_changed",
    "purchase.confirmed",
    "purchase.refunded",
    "unknown",
    // listener
    "service_order.created",
    "service_order.state_changed",
    "service_order.item_state_changed",
];

/// The valid value nearest to `unknown` (Levenshtein distance; the first of equals).
pub fn nearest<'a>(unknown: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .copied()
        .min_by_key(|v| strsim::levenshtein(&unknown.to_ascii_lowercase(), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists follow the code: every kind a source can emit is in [`KINDS`].
    #[test]
    fn every_emitted_kind_is_listed() {
        let mut emitted: Vec<&str> = vec![
            erp::Feed::Customer.event_kind(),
            erp::Feed::Subscription.event_kind(),
            akinon::Endpoint::SubscribeEmail.event_kind(),
            akinon::Endpoint::SubscribeUser.event_kind(),
            akinon::Endpoint::OrderInfo.event_kind(),
            "consent.opted_in",
            "consent.opted_out",
        ];
        emitted.extend(listener::EventType::ALL.iter().map(|t| t.kind()));
        for kind in emitted {
            assert!(KINDS.contains(&kind), "{kind} is not in KINDS");
        }
        assert_eq!(nearest("akinn", SOURCES), Some("akinon"));
        assert_eq!(nearest("customer.change", KINDS), Some("customer.changed"));
        assert_eq!(nearest("Order.Created", KINDS), Some("order.changed"));
    }
}
