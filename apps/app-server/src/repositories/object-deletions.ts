import type { Pool } from 'pg';

/**
 * The outbox of objects to delete from the store (migration 0010): an upload queues its object
 * before the first byte is stored, due once the upload can no longer be running; its file row
 * takes the entry off again (`files.createWithinQuota`); the row's deletion puts it back, due at once
 * (a trigger on `files`). So an object no row knows is always queued, whenever A crashed.
 */
export function objectDeletionsRepository(db: Pool) {
  return {
    /**
     * Queues an object for deletion in `delaySeconds` (0: now), or sooner if it is queued for
     * sooner already.
     */
    async queue(objectId: string, delaySeconds = 0): Promise<void> {
      await db.query(
        `INSERT INTO object_deletions (object_id, next_attempt_at)
         VALUES ($1, now() + make_interval(secs => $2))
         ON CONFLICT (object_id) DO UPDATE
           SET next_attempt_at = least(object_deletions.next_attempt_at, excluded.next_attempt_at)`,
        [objectId, delaySeconds],
      );
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
