-- Up Migration

-- Share links: a file shared with people who have no account. A share only mints download
-- tokens (one per download), so it can be revoked at once, expire and be counted exactly across
-- replicas. Deleting the file deletes its shares (the link is then unknown: 404).
CREATE TABLE shares (
  id               text PRIMARY KEY,
  file_id          text NOT NULL REFERENCES files (id) ON DELETE CASCADE,
  user_id          text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  -- argon2id of the share's password; NULL: no password.
  password_hash    text,
  expires_at       timestamptz NOT NULL,
  -- NULL: unlimited.
  max_downloads    integer CHECK (max_downloads >= 1),
  downloads        integer NOT NULL DEFAULT 0,
  last_download_at timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now(),
  revoked_at       timestamptz
);
CREATE INDEX shares_user_id_created_at_idx ON shares (user_id, created_at DESC);
CREATE INDEX shares_file_id_idx ON shares (file_id);

-- Down Migration

DROP TABLE shares;
