import type { Pool } from 'pg';

export interface SessionRow {
  userId: string | null;
  data: Record<string, unknown>;
  lastSeenAt: Date;
}

export interface SessionSummary {
  id: string;
  current: boolean;
  userAgent: string | null;
  ip: string | null;
  createdAt: Date;
  lastSeenAt: Date;
}

// A session is alive while it is not revoked, younger than its absolute timeout (expires_at)
// and used within the idle timeout ($idle seconds).
const ALIVE = (idle: string) =>
  `revoked_at IS NULL AND expires_at > now() AND last_seen_at > now() - make_interval(secs => ${idle})`;

/** Sessions keyed by the SHA-256 of their id (migrations 0001 and 0003). */
export function sessionsRepository(db: Pool) {
  return {
    async get(idHash: string, idleSeconds: number): Promise<SessionRow | undefined> {
      // A named statement: on every signed-in request, so Postgres plans it once per connection.
      const { rows } = await db.query<SessionRow>({
        name: 'sessions.get',
        // A signed-in session lives only under the credential version it signed in with.
        text: `SELECT user_id AS "userId", data, last_seen_at AS "lastSeenAt"
                 FROM sessions WHERE id_hash = $1 AND ${ALIVE('$2')}
                  AND (user_id IS NULL OR coalesce((data->>'credentialVersion')::int, 0) =
                       (SELECT credential_version FROM users WHERE users.id = sessions.user_id))`,
        values: [idHash, idleSeconds],
      });
      return rows[0];
    },

    async touch(idHash: string): Promise<void> {
      await db.query('UPDATE sessions SET last_seen_at = now() WHERE id_hash = $1 AND revoked_at IS NULL', [
        idHash,
      ]);
    },

    /**
     * Creates or updates a session. A revoked id is never written back: the update is skipped,
     * so a request that was in flight during logout cannot resurrect the session.
     */
    async upsert(
      idHash: string,
      row: { userId: string | null; data: Record<string, unknown>; expiresAt: Date },
    ) {
      await db.query(
        `INSERT INTO sessions (id_hash, user_id, data, expires_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id_hash) DO UPDATE SET user_id = EXCLUDED.user_id, data = EXCLUDED.data, last_seen_at = now(),
           -- Signing in (an anonymous row gets a user) starts the absolute timeout.
           expires_at = CASE WHEN sessions.user_id IS DISTINCT FROM EXCLUDED.user_id
                             THEN EXCLUDED.expires_at ELSE sessions.expires_at END
          WHERE sessions.revoked_at IS NULL`,
        [idHash, row.userId, row.data, row.expiresAt],
      );
    },

    /** Ends a session; it stays as a tombstone until it would have expired. */
    async revoke(idHash: string): Promise<void> {
      await db.query('UPDATE sessions SET revoked_at = now() WHERE id_hash = $1 AND revoked_at IS NULL', [
        idHash,
      ]);
    },

    async listForUser(userId: string, currentIdHash: string, idleSeconds: number): Promise<SessionSummary[]> {
      const { rows } = await db.query<SessionSummary>(
        `SELECT public_id AS id, id_hash = $2 AS current, data->>'userAgent' AS "userAgent", data->>'ip' AS ip,
                created_at AS "createdAt", last_seen_at AS "lastSeenAt"
           FROM sessions WHERE user_id = $1 AND ${ALIVE('$3')}
          ORDER BY last_seen_at DESC`,
        [userId, currentIdHash, idleSeconds],
      );
      return rows;
    },

    /** Ends one of the user's sessions by its public id; false if there is no such live session. */
    async revokeForUser(userId: string, publicId: string): Promise<boolean> {
      const { rowCount } = await db.query(
        'UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND public_id = $2 AND revoked_at IS NULL',
        [userId, publicId],
      );
      return rowCount === 1;
    },

    /** Ends every session of the user but `keepIdHash` (sign out everywhere else, password change). */
    async revokeOthers(userId: string, keepIdHash: string): Promise<number> {
      const { rowCount } = await db.query(
        'UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND id_hash <> $2 AND revoked_at IS NULL',
        [userId, keepIdHash],
      );
      return rowCount ?? 0;
    },

    /** Signed-in sessions that are alive, for the metrics. */
    async countSignedIn(idleSeconds: number): Promise<number> {
      const { rows } = await db.query<{ count: number }>(
        `SELECT count(*)::int AS count FROM sessions WHERE user_id IS NOT NULL AND ${ALIVE('$1')}`,
        [idleSeconds],
      );
      return rows[0]?.count ?? 0;
    },

    /** Drops rows past their absolute timeout, tombstones included. */
    async deleteExpired(): Promise<number> {
      const { rowCount } = await db.query('DELETE FROM sessions WHERE expires_at < now()');
      return rowCount ?? 0;
    },
  };
}
