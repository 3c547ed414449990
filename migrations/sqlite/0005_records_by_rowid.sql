-- Records were clustered on (kind, key): every new record was inserted, document and all, at a
-- random place in the table's B-tree. With documents of a few hundred bytes a leaf holds a dozen
-- rows, so new keys split leaves (and rebalance their neighbours) every few inserts, and each
-- event dirtied several pages of WAL. A rowid table appends new rows at its end, pages shared by
-- the whole batch; only the small (kind, key) index is written at random.
CREATE TABLE records_by_rowid (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    doc         TEXT    NOT NULL,
    hash        TEXT    NOT NULL,
    occurred_at INTEGER,
    changed_at  INTEGER NOT NULL,
    changed_by  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL,
    seen_by     INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    UNIQUE (kind, key)
);
INSERT INTO records_by_rowid (kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version)
    SELECT kind, key, doc, hash, occurred_at, changed_at, changed_by, seen_at, seen_by, version
    FROM records ORDER BY changed_by;
DROP TABLE records;
ALTER TABLE records_by_rowid RENAME TO records;
