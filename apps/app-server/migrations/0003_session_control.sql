-- Up Migration

-- A destroyed session stays as a tombstone until it would have expired anyway, so a request that
-- was in flight during logout cannot write it back (the store never resurrects a revoked id).
ALTER TABLE sessions ADD COLUMN revoked_at timestamptz;
-- The id shown in the session list: not the session id, not its hash.
ALTER TABLE sessions ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX sessions_public_id_key ON sessions (public_id);

-- Failed sign-ins, for throttling per account and per client IP; shared by every replica.
CREATE TABLE login_failures (
  id       bigserial PRIMARY KEY,
  username text NOT NULL,
  ip       text NOT NULL,
  at       timestamptz NOT NULL DEFAULT now(),
  -- A successful sign-in clears the account's count; the rows still count for their IP.
  cleared  boolean NOT NULL DEFAULT false
);
CREATE INDEX login_failures_username_at_idx ON login_failures (username, at);
CREATE INDEX login_failures_ip_at_idx ON login_failures (ip, at);

-- Down Migration

DROP TABLE login_failures;
ALTER TABLE sessions DROP COLUMN public_id, DROP COLUMN revoked_at;
