-- Every accepted event, as received. A duplicate dedupe key is refused by the unique index.
CREATE TABLE inbox (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    entity      TEXT    NOT NULL,
    dedupe_key  TEXT    NOT NULL UNIQUE,
    occurred_at INTEGER,
    received_at INTEGER NOT NULL,
    outcome     TEXT    NOT NULL DEFAULT 'pending',
    meta        TEXT    NOT NULL,
    raw         BLOB    NOT NULL
);
CREATE INDEX inbox_entity ON inbox (source, entity);

-- Current state of every entity (ERP customers and subscriptions, and every later source).
CREATE TABLE records (
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
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;

-- Relations: (kind, from) → to. E.g. erp.subscription.party: subscription id → customer id.
CREATE TABLE links (
    kind     TEXT NOT NULL,
    from_key TEXT NOT NULL,
    to_key   TEXT NOT NULL,
    PRIMARY KEY (kind, from_key, to_key)
) WITHOUT ROWID;
CREATE INDEX links_to ON links (kind, to_key);

-- Append-only timelines.
CREATE TABLE history (
    id       INTEGER PRIMARY KEY,
    kind     TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    at       INTEGER NOT NULL,
    inbox_id INTEGER NOT NULL,
    doc      TEXT    NOT NULL
);
CREATE INDEX history_key ON history (kind, key, id);
CREATE INDEX history_at ON history (kind, at);
