-- The catalog version each copied product is at (ProductCreated.version);
-- 0 for entries copied from events that carried none.
ALTER TABLE catalog ADD COLUMN version bigint NOT NULL DEFAULT 0;
