-- Up Migration

-- Objects to delete from the object store: the outbox that keeps rows and bytes in step. A file
-- row's deletion (by the user, or by a cascade from its user) queues its object in the same
-- transaction; A deletes the object at once and removes the entry, and a periodic sweep retries
-- what failed (the bucket was down). So no row ever points at a deleted object, and no object
-- outlives its row for longer than the store stays unreachable.
CREATE TABLE object_deletions (
  object_id       text PRIMARY KEY,
  attempts        integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX object_deletions_due ON object_deletions (next_attempt_at);

CREATE FUNCTION queue_object_deletion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO object_deletions (object_id) VALUES (OLD.object_id) ON CONFLICT DO NOTHING;
  RETURN NULL;
END
$$;

CREATE TRIGGER files_queue_object_deletion AFTER DELETE ON files
  FOR EACH ROW EXECUTE FUNCTION queue_object_deletion();

-- Down Migration

DROP TRIGGER files_queue_object_deletion ON files;
DROP FUNCTION queue_object_deletion();
DROP TABLE object_deletions;
