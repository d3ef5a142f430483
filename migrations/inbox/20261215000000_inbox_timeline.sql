-- What a timeline of one business flow (an order's saga) needs from each
-- consumer: the flow the message belongs to (its correlation id), who
-- produced it, and when it happened; `received_at` is when the consumer's
-- transaction began.
--
-- Nullable columns without defaults: existing rows are not rewritten, so
-- the lock is brief; it is not waited for long behind busy consumers.

SET LOCAL lock_timeout = '10s';

ALTER TABLE inbox
    ADD COLUMN correlation_id uuid,
    ADD COLUMN source         text,
    ADD COLUMN occurred_at    timestamptz;
