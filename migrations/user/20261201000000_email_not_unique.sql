-- An e-mail address is a customer's contact detail, not an identity: the
-- token issuer owns identities. Unique addresses let anyone find out which
-- addresses are registered, so they are no longer enforced.
ALTER TABLE users DROP CONSTRAINT users_email_key;
