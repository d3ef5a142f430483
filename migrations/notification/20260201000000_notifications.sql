-- Notifications sent to customers, one per order outcome.

CREATE TABLE notifications (
    id          uuid        PRIMARY KEY,
    order_id    uuid        NOT NULL,
    customer_id uuid        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('confirmed', 'cancelled')),
    channel     text        NOT NULL,
    body        text        NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, kind)
);

CREATE INDEX notifications_by_customer ON notifications (customer_id, sent_at DESC);
