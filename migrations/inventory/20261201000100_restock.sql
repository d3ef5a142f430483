-- Stock committed to an order that staff cancel after confirmation goes
-- back on hand: the reservation ends 'restocked'.
ALTER TABLE reservations DROP CONSTRAINT reservations_status_check;
ALTER TABLE reservations ADD CONSTRAINT reservations_status_check
    CHECK (status IN ('reserved', 'released', 'committed', 'restocked'));
