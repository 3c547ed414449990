//! Which destinations an event goes to. Built once from the configuration and handed to the
//! ingest pipeline, which writes one outbox row per match inside the event's savepoint.

use std::collections::BTreeSet;

use crate::{
    config::{DestinationKind, Settings},
    delivery::{
        contact::{contact_key, with_ledger},
        event::{canonical_event_json, new_event_id, record_key, EventMeta, Outbound},
        retry::schedule_text,
    },
    envelope::Envelope,
    store::{NewOutboxRow, StoreError, StoreTx},
};

/// One destination's filter.
#[derive(Debug, Clone)]
pub struct Route {
    pub destination: String,
    pub kind: DestinationKind,
    /// Empty: every source.
    pub sources: BTreeSet<String>,
    /// Empty: every kind.
    pub kinds: BTreeSet<String>,
    /// Stored with each row (the schedule in force when the change was committed).
    pub schedule: String,
    /// Emarsys: the contact view field a row needs (the key), and the kinds sent as external
    /// events (the rest are contact upserts, which coalesce).
    pub contact_key: Option<String>,
    pub event_kinds: BTreeSet<String>,
}

impl Route {
    /// Does this route take the event, and is its row a coalescable snapshot?
    pub fn accepts(&self, source: &str, kind: &str, outbound: &Outbound) -> Option<bool> {
        if !self.sources.is_empty() && !self.sources.contains(source) {
            return None;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(kind) {
            return None;
        }
        match &self.contact_key {
            None => Some(false),
            // Emarsys: only events about a person whose key is known.
            Some(field) => {
                let contact = outbound.contact.as_ref()?;
                contact.field(field)?;
                Some(!self.event_kinds.contains(kind))
            }
        }
    }
}

/// Every configured destination's route (disabled destinations too: their rows wait).
#[derive(Debug, Clone, Default)]
pub struct OutboxRoutes {
    routes: Vec<Route>,
}

impl OutboxRoutes {
    pub fn from_settings(settings: &Settings) -> Self {
        let routes = settings
            .destinations
            .iter()
            .map(|d| {
                let emarsys = (d.kind == DestinationKind::Emarsys).then(|| d.emarsys());
                Route {
                    destination: d.name.clone(),
                    kind: d.kind,
                    sources: d.sources.iter().cloned().collect(),
                    kinds: d.kinds.iter().cloned().collect(),
                    schedule: schedule_text(d.schedule(&settings.delivery)),
                    contact_key: emarsys
                        .as_ref()
                        .and_then(|e| e.key_field().map(str::to_owned)),
                    event_kinds: emarsys
                        .map(|e| e.event_ids.keys().cloned().collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Self { routes }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Write the outbox rows of one real change (inside the ingest transaction). The change
    /// says what it tells the providers; no answer, no rows. The contact's consents are the
    /// ledger's, read in this transaction.
    pub fn write_outbox(
        &self,
        tx: &mut dyn StoreTx,
        env: &Envelope,
        inbox_id: i64,
    ) -> Result<usize, StoreError> {
        if self.routes.is_empty() {
            return Ok(0);
        }
        let Some(mut outbound) = env.change.outbound(tx)? else {
            return Ok(0);
        };
        if let Some(contact) = outbound.contact.as_mut() {
            with_ledger(tx, contact)?;
        }
        let mut payload: Option<String> = None;
        let entity = record_key(env.source, outbound.record, &env.entity);
        let mut written = 0;
        for route in &self.routes {
            let Some(coalesce) = route.accepts(env.source, &env.kind, &outbound) else {
                continue;
            };
            let payload = payload.get_or_insert_with(|| {
                let meta = EventMeta {
                    inbox_id,
                    kind: &env.kind,
                    source: env.source,
                    entity: &env.entity,
                    occurred_at: env.occurred_at,
                    received_at: env.received_at,
                };
                canonical_event_json(&new_event_id(), &meta, &outbound)
            });
            let contact = outbound
                .contact
                .as_ref()
                .and_then(|c| contact_key(c, route.contact_key.as_deref()));
            tx.insert_outbox(&NewOutboxRow {
                destination: &route.destination,
                source: env.source,
                kind: &env.kind,
                entity: &entity,
                contact_key: contact.as_deref(),
                inbox_id,
                payload,
                coalesce,
                schedule: &route.schedule,
                created_at: env.received_at,
            })?;
            written += 1;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::delivery::event::ContactView;

    fn route(contact_key: Option<&str>) -> Route {
        Route {
            destination: "d".into(),
            kind: DestinationKind::Webhook,
            sources: ["erp".to_owned()].into(),
            kinds: BTreeSet::new(),
            schedule: String::new(),
            contact_key: contact_key.map(str::to_owned),
            event_kinds: ["order.created".to_owned()].into(),
        }
    }

    #[test]
    fn filters_by_source_kind_and_contact_key() {
        let person = Outbound {
            record: "customer",
            data: json!({}),
            contact: Some(ContactView {
                email: Some("a@example.com".into()),
                ..ContactView::default()
            }),
        };
        let thing = Outbound {
            record: "subscription",
            data: json!({}),
            contact: None,
        };
        let webhook = route(None);
        assert_eq!(webhook.accepts("erp", "x", &thing), Some(false));
        assert_eq!(webhook.accepts("akinon", "x", &thing), None);
        let emarsys = route(Some("email"));
        assert_eq!(
            emarsys.accepts("erp", "customer.changed", &person),
            Some(true)
        );
        assert_eq!(
            emarsys.accepts("erp", "order.created", &person),
            Some(false)
        );
        assert_eq!(emarsys.accepts("erp", "customer.changed", &thing), None);
        let by_phone = route(Some("phone"));
        assert_eq!(by_phone.accepts("erp", "customer.changed", &person), None);
    }
}
