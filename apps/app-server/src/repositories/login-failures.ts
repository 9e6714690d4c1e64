import type { Pool } from 'pg';

// The account is `lower(username)`, computed by Postgres, exactly as the unique index on users
// folds names: one account, one bucket (JavaScript's toLowerCase() folds some letters otherwise).

/**
 * Failed sign-ins (and password changes) in a sliding window, per account, per client IP and
 * per device cookie, shared by replicas.
 */
export function loginFailuresRepository(db: Pool) {
  return {
    /** Failures within the window, and when the oldest of each leaves it. */
    async recent(username: string, ip: string, device: string | null, windowSeconds: number) {
      const { rows } = await db.query<{
        account: number;
        client: number;
        device: number;
        accountFreeAt: Date | null;
        clientFreeAt: Date | null;
        deviceFreeAt: Date | null;
      }>(
        `SELECT count(*) FILTER (WHERE username = lower($1) AND NOT cleared)::int AS account,
                count(*) FILTER (WHERE ip = $2)::int AS client,
                count(*) FILTER (WHERE device = $3 AND NOT cleared)::int AS device,
                min(at) FILTER (WHERE username = lower($1) AND NOT cleared) + make_interval(secs => $4) AS "accountFreeAt",
                min(at) FILTER (WHERE ip = $2) + make_interval(secs => $4) AS "clientFreeAt",
                min(at) FILTER (WHERE device = $3 AND NOT cleared) + make_interval(secs => $4) AS "deviceFreeAt"
           FROM login_failures
          WHERE (username = lower($1) OR ip = $2 OR device = $3) AND at > now() - make_interval(secs => $4)`,
        [username, ip, device, windowSeconds],
      );
      return rows[0] as NonNullable<(typeof rows)[0]>;
    },

    /** Records an attempt (a failure until `remove`d); returns its id. */
    async record(username: string, ip: string, device: string | null): Promise<string> {
      const { rows } = await db.query<{ id: string }>(
        'INSERT INTO login_failures (username, ip, device) VALUES (lower($1), $2, $3) RETURNING id',
        [username, ip, device],
      );
      return rows[0]?.id as string;
    },

    async remove(id: string): Promise<void> {
      await db.query('DELETE FROM login_failures WHERE id = $1', [id]);
    },

    /**
     * A successful sign-in clears the failures of its device, or without a known device those of
     * the account; they still count for their IPs.
     */
    async clear(username: string, device: string | null): Promise<void> {
      await db.query(
        `UPDATE login_failures SET cleared = true
          WHERE NOT cleared AND CASE WHEN $2::text IS NULL THEN username = lower($1) ELSE device = $2 END`,
        [username, device],
      );
    },

    /** Drops failures older than the window: they count for nothing any more. */
    async deleteOlderThan(windowSeconds: number): Promise<void> {
      await db.query('DELETE FROM login_failures WHERE at < now() - make_interval(secs => $1)', [
        windowSeconds,
      ]);
    },
  };
}
