-- The delivery outbox: one row per (real change, matching destination), written in the ingest
-- transaction. Workers claim due rows with a lease (`locked_until`); PostgreSQL mirrors the claim
-- with FOR UPDATE SKIP LOCKED.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    destination     TEXT    NOT NULL,
    source          TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    -- Ordering key ("source:entity"): per destination, rows of one key go out in id order.
    entity          TEXT    NOT NULL,
    inbox_id        INTEGER NOT NULL,
    -- The canonical event JSON (outbox_payloads; one per event, shared by its destinations).
    payload_id      INTEGER NOT NULL,
    -- 1: a snapshot; pending rows of the same key may be coalesced into the latest.
    coalesce        INTEGER NOT NULL DEFAULT 0,
    -- The retry schedule in force when the row was written (comma-separated milliseconds).
    schedule        TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    -- pending | delivered | dead | superseded
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    lease_owner     TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    last_response   TEXT,
    finished_at     INTEGER,
    superseded_by   INTEGER,
    replays         INTEGER NOT NULL DEFAULT 0
);
-- Partial indexes: delivered rows (the bulk, over time) leave every index but the primary key.
-- Claiming: due pending rows of one destination, oldest due first.
CREATE INDEX outbox_due ON outbox (destination, next_attempt_at, id) WHERE state = 'pending';
-- The ordering guard: is there an earlier pending row of the same key?
CREATE INDEX outbox_pending_entity ON outbox (destination, entity, id) WHERE state = 'pending';
-- Dead rows: listing, counting, replaying.
CREATE INDEX outbox_dead ON outbox (destination, created_at) WHERE state = 'dead';

-- Payloads apart from the rows: claiming and recording rewrite narrow rows, and an event going
-- to several destinations is stored once.
CREATE TABLE outbox_payloads (
    id      INTEGER PRIMARY KEY,
    payload TEXT    NOT NULL
);

-- Every attempt: when, how long, what came back.
CREATE TABLE delivery_attempts (
    id          INTEGER PRIMARY KEY,
    outbox_id   INTEGER NOT NULL,
    destination TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    latency_ms  INTEGER NOT NULL,
    -- delivered | retry | dead
    outcome     TEXT    NOT NULL,
    status      INTEGER,
    error       TEXT,
    response    TEXT,
    next_attempt_at INTEGER
);
CREATE INDEX delivery_attempts_row ON delivery_attempts (outbox_id, id);

-- Every replay of dead rows: who, when, which filter, how many rows.
CREATE TABLE delivery_replays (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    destination TEXT,
    since       INTEGER,
    rows        INTEGER NOT NULL
);
