-- The saga timeout looks for orders still pending after a while.
CREATE INDEX orders_pending ON orders (placed_at) WHERE status = 'PENDING';
