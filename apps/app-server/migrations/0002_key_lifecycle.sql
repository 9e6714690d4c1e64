-- Up Migration

-- next: published, not signing until activates_at (B must have had time to fetch it).
-- previous: no longer signing, published until retires_at (its last tokens have expired).
ALTER TABLE signing_keys ADD COLUMN activates_at timestamptz;
ALTER TABLE signing_keys ADD COLUMN retires_at timestamptz;
ALTER TABLE signing_keys ADD COLUMN revoked_at timestamptz;

-- Down Migration

ALTER TABLE signing_keys DROP COLUMN activates_at, DROP COLUMN retires_at, DROP COLUMN revoked_at;
