-- Transactional outbox, shared by every service database.
--
-- A service inserts its domain events here in the same transaction as the
-- domain change. `outbox-relay` publishes pending rows to RabbitMQ and marks
-- them published once the broker confirms them; a sweeper deletes published
-- rows after a retention period.

-- Number of partitions the aggregates hash into. Relay instances lease
-- partitions, so all events of one aggregate are published by one instance at
-- a time, in `id` order.
CREATE FUNCTION outbox_partition_count() RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 32';

CREATE TABLE outbox (
    -- Publication order. Writers of one aggregate serialise on the aggregate's
    -- own row, so within an aggregate `id` order is commit order.
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Unique event id (UUIDv7); the AMQP message_id consumers deduplicate by.
    message_id      uuid        NOT NULL UNIQUE,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    partition       integer     NOT NULL GENERATED ALWAYS AS (
        (hashtext(aggregate_type || '/' || aggregate_id) & 2147483647) % outbox_partition_count()
    ) STORED,
    -- Full protobuf message name, also the routing key.
    event_type      text        NOT NULL,
    payload         bytea       NOT NULL,
    content_type    text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    correlation_id  uuid,
    causation_id    uuid,
    -- W3C trace context of the span that wrote the event.
    traceparent     text,
    -- Delivery bookkeeping, written only by the relay.
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    quarantined_at  timestamptz,
    published_at    timestamptz
) WITH (
    -- Rows are short-lived: vacuum early so sustained load does not bloat.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- Pending rows in publication order.
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- Rows that hold back the later rows of their aggregate: quarantined, or
-- waiting for a retry.
CREATE INDEX outbox_blocked ON outbox (aggregate_type, aggregate_id, id)
    WHERE published_at IS NULL AND (quarantined_at IS NOT NULL OR next_attempt_at IS NOT NULL);

-- Wake the relay when events are committed. One notification per statement,
-- and PostgreSQL folds identical notifications of one transaction into one.
CREATE FUNCTION outbox_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_notify();
