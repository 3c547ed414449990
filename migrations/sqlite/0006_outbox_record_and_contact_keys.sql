-- Outbox rows name the record they are about (`source:record:entity`, e.g. `akinon:user:1` and
-- `akinon:order:1`, which used to share the key `akinon:1` and superseded each other), and the
-- contact they tell a provider about: rows about one contact (from any record or source) go out
-- one at a time, in commit order, so the last consent a provider hears is the ledger's.
ALTER TABLE outbox ADD COLUMN contact_key TEXT;
-- The contact guard: is there an earlier pending row about the same contact?
CREATE INDEX outbox_pending_contact ON outbox (destination, contact_key, id)
    WHERE state = 'pending' AND contact_key IS NOT NULL;
-- Rows still to be sent (or replayed) get the new keys; delivered history keeps its old ones.
UPDATE outbox
   SET entity = source || ':' ||
       CASE
           WHEN source = 'erp' AND kind = 'subscription.changed' THEN 'subscription'
           WHEN source = 'erp' THEN 'customer'
           WHEN source = 'akinon' AND kind = 'order.changed' THEN 'order'
           WHEN source = 'akinon' AND kind = 'email.subscribed' THEN 'email'
           WHEN source = 'akinon' THEN 'user'
           WHEN source IN ('admin', 'unsubscribe_link') THEN 'consent'
           WHEN source = 'loymax' THEN 'member'
           WHEN source = 'listener' THEN 'service_order'
           ELSE 'record'
       END || ':' || substr(entity, length(source) + 2),
       contact_key = (SELECT 'email:' || lower(trim(json_extract(p.payload, '$.contact.email')))
                        FROM outbox_payloads p
                       WHERE p.id = outbox.payload_id AND json_valid(p.payload)
                         AND json_extract(p.payload, '$.contact.email') IS NOT NULL)
 WHERE state IN ('pending', 'dead') AND substr(entity, 1, length(source) + 1) = source || ':';
