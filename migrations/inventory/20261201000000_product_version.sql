-- Every catalog change numbers the product: consumers keeping a copy of the
-- catalog apply only newer versions, so events applied late or retried
-- never undo a later change.
ALTER TABLE products ADD COLUMN version bigint NOT NULL DEFAULT 1 CHECK (version >= 1);
