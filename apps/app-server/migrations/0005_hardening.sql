-- Up Migration

-- Bumped by every password change. A session remembers the version it signed in under and is
-- dead on load once they differ, so a sign-in with the old password that raced the change (and
-- saved its session after the change ended the others) does not survive it.
ALTER TABLE users ADD COLUMN credential_version integer NOT NULL DEFAULT 0;

-- The device cookie a failed sign-in came with: a device that signed in to the account before is
-- not subject to the account's limit (an attacker cannot lock the owner out), only to its own.
ALTER TABLE login_failures ADD COLUMN device text;
CREATE INDEX login_failures_device_at_idx ON login_failures (device, at) WHERE device IS NOT NULL;

-- Registrations per client IP (REGISTRATIONS_PER_IP_PER_HOUR), shared by every replica.
CREATE TABLE registrations (
  id bigserial PRIMARY KEY,
  ip text NOT NULL,
  at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX registrations_ip_at_idx ON registrations (ip, at);

-- Bytes reserved by uploads in progress, so that concurrent uploads cannot together exceed the
-- quota on disk. A reservation of a crashed replica lapses at expires_at.
CREATE TABLE upload_reservations (
  id         bigserial PRIMARY KEY,
  user_id    text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  bytes      bigint NOT NULL CHECK (bytes > 0),
  expires_at timestamptz NOT NULL
);
CREATE INDEX upload_reservations_user_id_idx ON upload_reservations (user_id);

-- Down Migration

DROP TABLE upload_reservations;
DROP TABLE registrations;
DROP INDEX login_failures_device_at_idx;
ALTER TABLE login_failures DROP COLUMN device;
ALTER TABLE users DROP COLUMN credential_version;
