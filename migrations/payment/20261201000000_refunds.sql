-- Refunds: a charge for an order cancelled meanwhile is refunded, and an
-- order known to be cancelled is never charged.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('SUCCEEDED', 'FAILED', 'REFUNDED'));
ALTER TABLE payments ADD COLUMN refunded_at timestamptz;

CREATE TABLE cancelled_orders (
    order_id     uuid        PRIMARY KEY,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);
