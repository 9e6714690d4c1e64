import type { Pool } from 'pg';

/** The outbox of objects to delete from the store (migration 0010): filled by a trigger on `files`. */
export function objectDeletionsRepository(db: Pool) {
  return {
    /** Queues an object that has no row (a refused upload whose bytes could not be removed). */
    async queue(objectId: string): Promise<void> {
      await db.query('INSERT INTO object_deletions (object_id) VALUES ($1) ON CONFLICT DO NOTHING', [
        objectId,
      ]);
    },

    /** The object is gone from the store. */
    async done(objectId: string): Promise<void> {
      await db.query('DELETE FROM object_deletions WHERE object_id = $1', [objectId]);
    },

    /**
     * Up to `limit` entries that are due, each postponed by `retrySeconds` times its attempts so
     * far (another replica's sweep skips them meanwhile, and a store that stays down is not hammered).
     */
    async claimDue(limit: number, retrySeconds: number): Promise<string[]> {
      const { rows } = await db.query<{ objectId: string }>(
        `UPDATE object_deletions d
            SET attempts = d.attempts + 1,
                next_attempt_at = now() + make_interval(secs => $2::integer * least(d.attempts + 1, 60))
          WHERE object_id IN (
            SELECT object_id FROM object_deletions WHERE next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
          RETURNING object_id AS "objectId"`,
        [limit, retrySeconds],
      );
      return rows.map((row) => row.objectId);
    },
  };
}
