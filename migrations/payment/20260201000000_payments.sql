-- Payments: at most one charge per order.

CREATE TABLE payments (
    id             uuid        PRIMARY KEY,
    order_id       uuid        NOT NULL UNIQUE,
    customer_id    uuid        NOT NULL,
    amount_minor   bigint      NOT NULL,
    currency       text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('SUCCEEDED', 'FAILED')),
    failure_reason text        NOT NULL DEFAULT '',
    processed_at   timestamptz NOT NULL DEFAULT now()
);
