-- Inventory: the product catalog and its stock.

CREATE TABLE products (
    id          uuid        PRIMARY KEY,
    sku         text        NOT NULL UNIQUE,
    name        text        NOT NULL,
    price_minor bigint      NOT NULL CHECK (price_minor >= 0),
    currency    text        NOT NULL,
    on_hand     integer     NOT NULL CHECK (on_hand >= 0),
    -- Held for orders that are not confirmed yet; never more than on hand,
    -- so stock is never oversold.
    reserved    integer     NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= on_hand),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- What each order holds, and what became of it.
CREATE TABLE reservations (
    order_id   uuid    NOT NULL,
    product_id uuid    NOT NULL REFERENCES products (id),
    quantity   integer NOT NULL CHECK (quantity > 0),
    status     text    NOT NULL CHECK (status IN ('reserved', 'released', 'committed')),
    PRIMARY KEY (order_id, product_id)
);

-- Orders known to be cancelled, so a late OrderPlaced reserves nothing.
CREATE TABLE cancelled_orders (
    order_id     uuid        PRIMARY KEY,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);
