import type { Pool } from 'pg';

/** Registrations per client IP in a sliding window, shared by replicas. */
export function registrationsRepository(db: Pool) {
  return {
    /**
     * Records a registration from `ip` and answers how many there were within the window, this
     * one included, and when the oldest leaves it. Recorded (and committed) before it is counted,
     * in two statements: of concurrent registrations on any replica, the last to count sees all
     * the others, so they cannot all pass the count. (In one statement they could: each sees
     * only the rows committed before it started.)
     */
    async record(ip: string, windowSeconds: number): Promise<{ id: string; count: number; freeAt: Date }> {
      const { rows: added } = await db.query<{ id: string }>(
        'INSERT INTO registrations (ip) VALUES ($1) RETURNING id',
        [ip],
      );
      const { rows } = await db.query<{ count: number; freeAt: Date }>(
        `SELECT count(*)::int AS count, min(at) + make_interval(secs => $2) AS "freeAt"
           FROM registrations WHERE ip = $1 AND at > now() - make_interval(secs => $2)`,
        [ip, windowSeconds],
      );
      return { id: added[0]?.id as string, ...(rows[0] as { count: number; freeAt: Date }) };
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
