-- Notify only relays that are idle.
--
-- NOTIFY takes a database-wide lock from the commit's start to its end, so
-- every notifying commit waits for the previous one's WAL flush: under load
-- it serialises all writers. A relay that is busy does not need waking (it
-- fetches again as soon as a batch is out), so writers notify only while
-- some relay waiting for new rows of their partitions has armed itself here.
--
-- A relay arms by upserting its row, then takes a snapshot and looks for
-- rows once more after every transaction in progress at that moment has
-- ended; a writer whose check ran before the row was visible is one of
-- those transactions, so no commit is left waiting for the poll interval.

-- Idle relays: the lease session's pid and the partitions it waits for.
-- Unlogged: after a crash the table is empty and relays arm again when they
-- reconnect.
CREATE UNLOGGED TABLE outbox_listener (
    pid        integer     PRIMARY KEY,
    partitions integer[]   NOT NULL,
    armed_at   timestamptz NOT NULL DEFAULT now()
);

DROP TRIGGER outbox_notify ON outbox;

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM outbox_listener l
        WHERE EXISTS (SELECT 1 FROM outbox_inserted i WHERE i.partition = ANY (l.partitions))
    ) THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS outbox_inserted
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_notify();
