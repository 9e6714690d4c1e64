import type { Pool } from 'pg';

// The account is `lower(username)`, computed by Postgres, exactly as the unique index on users
// folds names: one account, one bucket (JavaScript's toLowerCase() folds some letters otherwise).

/**
 * Failed sign-ins (and password changes) in a sliding window, per account, per client IP and
 * per account's known devices (browsers with a valid device cookie), shared by replicas.
 */
export function loginFailuresRepository(db: Pool) {
  return {
    /**
     * Failures within the window, and when the oldest of each leaves it: of the account (all
     * of them), of the account's known devices together, and of the client IP.
     */
    async recent(username: string, ip: string, windowSeconds: number) {
      const { rows } = await db.query<{
        account: number;
        client: number;
        devices: number;
        accountFreeAt: Date | null;
        clientFreeAt: Date | null;
        devicesFreeAt: Date | null;
      }>(
        `SELECT count(*) FILTER (WHERE username = lower($1) AND NOT cleared)::int AS account,
                count(*) FILTER (WHERE ip = $2)::int AS client,
                count(*) FILTER (WHERE username = lower($1) AND device IS NOT NULL AND NOT cleared)::int AS devices,
                min(at) FILTER (WHERE username = lower($1) AND NOT cleared) + make_interval(secs => $3) AS "accountFreeAt",
                min(at) FILTER (WHERE ip = $2) + make_interval(secs => $3) AS "clientFreeAt",
                min(at) FILTER (WHERE username = lower($1) AND device IS NOT NULL AND NOT cleared) + make_interval(secs => $3) AS "devicesFreeAt"
           FROM login_failures
          WHERE (username = lower($1) OR ip = $2) AND at > now() - make_interval(secs => $3)`,
        [username, ip, windowSeconds],
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
     * A successful sign-in clears the failures of the account's known devices, or without a
     * known device all of the account's; they still count for their IPs.
     */
    async clear(username: string, knownDevice: boolean): Promise<void> {
      await db.query(
        `UPDATE login_failures SET cleared = true
          WHERE NOT cleared AND username = lower($1) AND ($2 = false OR device IS NOT NULL)`,
        [username, knownDevice],
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
