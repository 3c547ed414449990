-- Mirrors migrations/sqlite/0006_outbox_record_and_contact_keys.sql: outbox rows name their
-- record (`source:record:entity`) and the contact they are about (the contact guard).
ALTER TABLE outbox ADD COLUMN contact_key TEXT;
CREATE INDEX outbox_pending_contact ON outbox (destination, contact_key, id)
    WHERE state = 'pending' AND contact_key IS NOT NULL;
UPDATE outbox o
   SET entity = o.source || ':' ||
       CASE
           WHEN o.source = 'erp' AND o.kind = 'subscription.changed' THEN 'subscription'
           WHEN o.source = 'erp' THEN 'customer'
           WHEN o.source = 'akinon' AND o.kind = 'order.changed' THEN 'order'
           WHEN o.source = 'akinon' AND o.kind = 'email.subscribed' THEN 'email'
           WHEN o.source = 'akinon' THEN 'user'
           WHEN o.source IN ('admin', 'unsubscribe_link') THEN 'consent'
           WHEN o.source = 'loymax' THEN 'member'
           WHEN o.source = 'listener' THEN 'service_order'
           ELSE 'record'
       END || ':' || substr(o.entity, length(o.source) + 2),
       contact_key = (SELECT 'email:' || lower(btrim(p.payload::jsonb -> 'contact' ->> 'email'))
                        FROM outbox_payloads p
                       WHERE p.id = o.payload_id
                         AND p.payload::jsonb -> 'contact' ->> 'email' IS NOT NULL)
 WHERE o.state IN ('pending', 'dead') AND starts_with(o.entity, o.source || ':');
