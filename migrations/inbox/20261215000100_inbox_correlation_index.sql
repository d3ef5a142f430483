-- no-transaction
-- Built without blocking the consumers' inserts.
CREATE INDEX CONCURRENTLY IF NOT EXISTS inbox_correlation
    ON inbox (correlation_id) WHERE correlation_id IS NOT NULL;
