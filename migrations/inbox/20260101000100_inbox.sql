-- Inbox, shared by every service database.
--
-- A subscriber records each message id here in the same transaction as the
-- handler's effect. A redelivered message finds its id already present and
-- is acknowledged without running the handler again.

CREATE TABLE inbox (
    -- Subscriber name; several subscribers may share one database.
    consumer    text        NOT NULL,
    message_id  uuid        NOT NULL,
    event_type  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Pruning of old entries.
CREATE INDEX inbox_received_at ON inbox (received_at);
