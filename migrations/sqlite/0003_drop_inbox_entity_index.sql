-- Nothing reads the inbox by entity, and with varied entity keys every event dirtied a page of
-- this index at random: one more B-tree insert and one more WAL page per event for no reader.
DROP INDEX IF EXISTS inbox_entity;
