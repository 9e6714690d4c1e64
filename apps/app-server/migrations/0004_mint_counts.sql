-- Up Migration

-- Download tokens minted per user in the current minute (MINT_RATE_PER_MINUTE), shared by every
-- replica. UNLOGGED: counting writes no WAL, so a mint waits for no disk flush; after a crash the
-- counts start again from 0, which is harmless for a limit per minute.
CREATE UNLOGGED TABLE mint_counts (
  user_id      text PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
  window_start timestamptz NOT NULL,
  count        integer NOT NULL
);

-- Down Migration

DROP TABLE mint_counts;
