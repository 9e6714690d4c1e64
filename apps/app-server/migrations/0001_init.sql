-- Up Migration

CREATE TABLE users (
  id            text PRIMARY KEY,
  username      text NOT NULL,
  password_hash text NOT NULL,
  created_at    timestamptz NOT NULL DEFAULT now()
);
-- Unique without regard to case: "Alice" and "alice" are one account.
CREATE UNIQUE INDEX users_username_key ON users (lower(username));

CREATE TABLE sessions (
  -- SHA-256 of the session id. The id itself lives only in the user's cookie, so a leaked
  -- database (or backup) does not hand out live sessions.
  id_hash      text PRIMARY KEY,
  user_id      text REFERENCES users (id) ON DELETE CASCADE,
  data         jsonb NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now(),
  last_seen_at timestamptz NOT NULL DEFAULT now(),
  expires_at   timestamptz NOT NULL
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id);
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);

CREATE TABLE files (
  id           text PRIMARY KEY,
  user_id      text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  object_id    text NOT NULL UNIQUE,
  name         text NOT NULL,
  content_type text NOT NULL,
  size         bigint NOT NULL CHECK (size >= 0),
  sha256       text NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_user_id_created_at_idx ON files (user_id, created_at DESC);

CREATE TABLE signing_keys (
  kid          text PRIMARY KEY,
  alg          text NOT NULL,
  state        text NOT NULL CHECK (state IN ('next', 'current', 'previous', 'revoked')),
  public_jwk   jsonb NOT NULL,
  private_key  text NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now(),
  activated_at timestamptz,
  retired_at   timestamptz
);
-- At most one key signs at any time.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys (state) WHERE state = 'current';

-- Down Migration

DROP TABLE signing_keys;
DROP TABLE files;
DROP TABLE sessions;
DROP TABLE users;
