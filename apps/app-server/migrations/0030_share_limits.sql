-- Up Migration

-- Downloads minted through share links per minute, per share and per owner (all their shares
-- together), shared by every replica. Apart from mint_counts, so that what the public spends
-- through a link never takes from the owner's own MINT_RATE_PER_MINUTE. UNLOGGED like
-- mint_counts: a count per minute may start again from 0 after a crash.
CREATE UNLOGGED TABLE share_mint_counts (
  share_id     text PRIMARY KEY REFERENCES shares (id) ON DELETE CASCADE,
  window_start timestamptz NOT NULL,
  count        integer NOT NULL
);
CREATE UNLOGGED TABLE share_owner_mint_counts (
  user_id      text PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
  window_start timestamptz NOT NULL,
  count        integer NOT NULL
);

-- Wrong share passwords, per share and client IP, so that one holder of a link who guesses
-- locks out only their own address; the owner's share list shows the recent ones.
CREATE TABLE share_password_failures (
  id       bigserial PRIMARY KEY,
  share_id text NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
  ip       text NOT NULL,
  at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX share_password_failures_share_id_at_idx ON share_password_failures (share_id, at);
CREATE INDEX share_password_failures_at_idx ON share_password_failures (at);

-- Shares created per user and per client IP in the last hour (a password share costs an
-- argon2id hash).
CREATE TABLE share_creations (
  id      bigserial PRIMARY KEY,
  user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  ip      text NOT NULL,
  at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX share_creations_user_id_at_idx ON share_creations (user_id, at);
CREATE INDEX share_creations_ip_at_idx ON share_creations (ip, at);

-- Live shares per user and per file are counted at creation.
CREATE INDEX shares_live_user_id_idx ON shares (user_id, expires_at) WHERE revoked_at IS NULL;

-- Down Migration

DROP INDEX shares_live_user_id_idx;
DROP TABLE share_creations;
DROP TABLE share_password_failures;
DROP TABLE share_owner_mint_counts;
DROP TABLE share_mint_counts;
