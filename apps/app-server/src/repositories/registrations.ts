import type { Pool } from 'pg';

/** Registrations per client IP in a sliding window, shared by replicas. */
export function registrationsRepository(db: Pool) {
  return {
    /**
     * Records a registration from `ip` and answers how many there were within the window, this
     * one included, and when the oldest leaves it. Recorded before it is counted, so concurrent
     * registrations cannot all pass the count.
     */
    async record(ip: string, windowSeconds: number): Promise<{ id: string; count: number; freeAt: Date }> {
      const { rows } = await db.query<{ id: string; count: number; freeAt: Date }>(
        `WITH added AS (INSERT INTO registrations (ip) VALUES ($1) RETURNING id, at)
         SELECT added.id,
                (SELECT count(*) FROM registrations WHERE ip = $1 AND at > now() - make_interval(secs => $2))::int + 1 AS count,
                coalesce((SELECT min(at) FROM registrations WHERE ip = $1 AND at > now() - make_interval(secs => $2)), added.at)
                  + make_interval(secs => $2) AS "freeAt"
           FROM added`,
        [ip, windowSeconds],
      );
      return rows[0] as { id: string; count: number; freeAt: Date };
    },

    async remove(id: string): Promise<void> {
      await db.query('DELETE FROM registrations WHERE id = $1', [id]);
    },

    /** Drops registrations older than the window. */
    async deleteOlderThan(windowSeconds: number): Promise<void> {
      await db.query('DELETE FROM registrations WHERE at < now() - make_interval(secs => $1)', [
        windowSeconds,
      ]);
    },
  };
}
