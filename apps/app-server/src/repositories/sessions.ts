import type { Pool } from 'pg';

export interface SessionRow {
  userId: string | null;
  data: Record<string, unknown>;
  expiresAt: Date;
}

/** Sessions keyed by the SHA-256 of their id (see migrations/0001_init.sql). */
export function sessionsRepository(db: Pool) {
  return {
    async get(idHash: string): Promise<SessionRow | undefined> {
      const { rows } = await db.query<SessionRow>(
        `SELECT user_id AS "userId", data, expires_at AS "expiresAt"
           FROM sessions WHERE id_hash = $1 AND expires_at > now()`,
        [idHash],
      );
      return rows[0];
    },

    async upsert(idHash: string, row: SessionRow): Promise<void> {
      await db.query(
        `INSERT INTO sessions (id_hash, user_id, data, expires_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id_hash) DO UPDATE
           SET user_id = EXCLUDED.user_id, data = EXCLUDED.data, expires_at = EXCLUDED.expires_at, last_seen_at = now()`,
        [idHash, row.userId, row.data, row.expiresAt],
      );
    },

    async delete(idHash: string): Promise<void> {
      await db.query('DELETE FROM sessions WHERE id_hash = $1', [idHash]);
    },
  };
}
