-- Every accepted event, as received. A duplicate dedupe key is refused by the unique index.
CREATE TABLE inbox (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    entity      TEXT    NOT NULL,
    dedupe_key  TEXT    NOT NULL UNIQUE,
    occurred_at BIGINT,
    received_at BIGINT  NOT NULL,
    outcome     TEXT    NOT NULL DEFAULT 'applied',
    meta        TEXT    NOT NULL,
    raw         BYTEA   NOT NULL
);
CREATE INDEX inbox_entity ON inbox (source, entity);

-- Current state of every entity.
CREATE TABLE records (
    kind        TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    doc         TEXT    NOT NULL,
    hash        TEXT    NOT NULL,
    occurred_at BIGINT,
    changed_at  BIGINT  NOT NULL,
    changed_by  BIGINT  NOT NULL,
    seen_at     BIGINT  NOT NULL,
    seen_by     BIGINT  NOT NULL,
    version     BIGINT  NOT NULL,
    PRIMARY KEY (kind, key)
);

-- Relations: (kind, from) → to.
CREATE TABLE links (
    kind     TEXT NOT NULL,
    from_key TEXT NOT NULL,
    to_key   TEXT NOT NULL,
    PRIMARY KEY (kind, from_key, to_key)
);
CREATE INDEX links_to ON links (kind, to_key);

-- Append-only timelines.
CREATE TABLE history (
    id       BIGSERIAL PRIMARY KEY,
    kind     TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    at       BIGINT  NOT NULL,
    inbox_id BIGINT  NOT NULL,
    doc      TEXT    NOT NULL
);
CREATE INDEX history_key ON history (kind, key, id);
CREATE INDEX history_at ON history (kind, at);
