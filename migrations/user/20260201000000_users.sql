-- Users and their purchase history (built from OrderConfirmed).

CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL,
    email         text        NOT NULL UNIQUE,
    registered_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE purchases (
    order_id     uuid        PRIMARY KEY,
    user_id      uuid        NOT NULL,
    total_minor  bigint      NOT NULL,
    currency     text        NOT NULL,
    item_count   integer     NOT NULL,
    confirmed_at timestamptz NOT NULL
);

CREATE INDEX purchases_by_user ON purchases (user_id, confirmed_at DESC);
