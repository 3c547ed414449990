-- The delivery outbox (mirrors migrations/sqlite/0002_outbox.sql): one row per (real change,
-- matching destination), written in the ingest transaction. Workers of every instance claim due
-- rows with a lease (`locked_until`, `lease_owner`) in one UPDATE over a
-- SELECT … FOR UPDATE SKIP LOCKED, so two instances never lease the same row at once.
CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    destination     TEXT    NOT NULL,
    source          TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    -- Ordering key ("source:entity"): per destination, rows of one key go out in id order.
    entity          TEXT    NOT NULL,
    inbox_id        BIGINT  NOT NULL,
    -- The canonical event JSON (outbox_payloads; one per event, shared by its destinations).
    payload_id      BIGINT  NOT NULL,
    -- A snapshot: pending rows of the same key may be coalesced into the latest.
    coalesce        BOOLEAN NOT NULL DEFAULT FALSE,
    -- The retry schedule in force when the row was written (comma-separated milliseconds).
    schedule        TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    -- pending | delivered | dead | superseded
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    locked_until    BIGINT,
    lease_owner     TEXT,
    last_status     BIGINT,
    last_error      TEXT,
    last_response   TEXT,
    finished_at     BIGINT,
    superseded_by   BIGINT,
    replays         BIGINT  NOT NULL DEFAULT 0
);
-- Partial indexes: delivered rows (the bulk, over time) leave every index but the primary key.
-- Claiming: due pending rows of one destination, oldest due first.
CREATE INDEX outbox_due ON outbox (destination, next_attempt_at, id) WHERE state = 'pending';
-- The ordering guard: is there an earlier pending row of the same key?
CREATE INDEX outbox_pending_entity ON outbox (destination, entity, id) WHERE state = 'pending';
-- Dead rows: listing, counting, replaying.
CREATE INDEX outbox_dead ON outbox (destination, created_at) WHERE state = 'dead';
-- Graceful shutdown releases one owner's leases.
CREATE INDEX outbox_leased ON outbox (lease_owner) WHERE state = 'pending' AND lease_owner IS NOT NULL;

-- Payloads apart from the rows: claiming and recording rewrite narrow rows, and an event going
-- to several destinations is stored once.
CREATE TABLE outbox_payloads (
    id      BIGSERIAL PRIMARY KEY,
    payload TEXT    NOT NULL
);

-- Every attempt: when, how long, what came back.
CREATE TABLE delivery_attempts (
    id          BIGSERIAL PRIMARY KEY,
    outbox_id   BIGINT  NOT NULL,
    destination TEXT    NOT NULL,
    attempt     BIGINT  NOT NULL,
    started_at  BIGINT  NOT NULL,
    latency_ms  BIGINT  NOT NULL,
    -- delivered | retry | dead
    outcome     TEXT    NOT NULL,
    status      BIGINT,
    error       TEXT,
    response    TEXT,
    next_attempt_at BIGINT
);
CREATE INDEX delivery_attempts_row ON delivery_attempts (outbox_id, id);

-- Every replay of dead rows: who, when, which filter, how many rows.
CREATE TABLE delivery_replays (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT  NOT NULL,
    actor       TEXT    NOT NULL,
    destination TEXT,
    since       BIGINT,
    rows        BIGINT  NOT NULL
);
