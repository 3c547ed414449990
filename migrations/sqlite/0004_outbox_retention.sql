-- Retention (delivery.retention): a purged row's payload goes when no other row uses it, which
-- needs rows by payload.
CREATE INDEX outbox_payload ON outbox (payload_id);
