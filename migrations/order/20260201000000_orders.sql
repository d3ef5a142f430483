-- Orders, and the order service's local replicas of the catalog and of the
-- registered customers (both built from events).

CREATE TABLE catalog (
    product_id  uuid        PRIMARY KEY,
    sku         text        NOT NULL,
    name        text        NOT NULL,
    price_minor bigint      NOT NULL,
    currency    text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE customers (
    customer_id uuid        PRIMARY KEY,
    learned_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id                  uuid        PRIMARY KEY,
    customer_id         uuid        NOT NULL,
    status              text        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    cancel_reason       text        NOT NULL DEFAULT '',
    total_minor         bigint      NOT NULL,
    currency            text        NOT NULL,
    idempotency_key     text        NOT NULL,
    -- The request a key was first used with; a retry must match it.
    request_fingerprint text        NOT NULL,
    placed_at           timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    UNIQUE (customer_id, idempotency_key)
);

CREATE INDEX orders_by_customer ON orders (customer_id, placed_at DESC, id DESC);

CREATE TABLE order_lines (
    order_id         uuid    NOT NULL REFERENCES orders (id),
    line_no          integer NOT NULL,
    product_id       uuid    NOT NULL,
    quantity         integer NOT NULL CHECK (quantity > 0),
    unit_price_minor bigint  NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- Every saga event about an order, for people following it.
CREATE TABLE order_history (
    order_id    uuid        NOT NULL REFERENCES orders (id),
    message_id  uuid        NOT NULL,
    event_type  text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    detail      text        NOT NULL,
    PRIMARY KEY (order_id, message_id)
);
