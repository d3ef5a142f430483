-- Orders cancelled (by staff, after confirmation) leave the purchase
-- history; remembering them keeps a late OrderConfirmed from adding them.
CREATE TABLE cancelled_orders (
    order_id     uuid        PRIMARY KEY,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);
