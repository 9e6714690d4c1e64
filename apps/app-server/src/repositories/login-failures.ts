import type { Pool } from 'pg';

/** Failed sign-ins in a sliding window, per account and per client IP (shared by replicas). */
export function loginFailuresRepository(db: Pool) {
  return {
    /** Failures within the window, and when the oldest of each leaves it. */
    async recent(username: string, ip: string, windowSeconds: number) {
      const { rows } = await db.query<{
        account: number;
        client: number;
        accountFreeAt: Date | null;
        clientFreeAt: Date | null;
      }>(
        `SELECT count(*) FILTER (WHERE username = $1)::int AS account,
                count(*) FILTER (WHERE ip = $2)::int AS client,
                min(at) FILTER (WHERE username = $1) + make_interval(secs => $3) AS "accountFreeAt",
                min(at) FILTER (WHERE ip = $2) + make_interval(secs => $3) AS "clientFreeAt"
           FROM login_failures
          WHERE (username = $1 OR ip = $2) AND at > now() - make_interval(secs => $3)`,
        [username, ip, windowSeconds],
      );
      return rows[0] as NonNullable<(typeof rows)[0]>;
    },

    async record(username: string, ip: string): Promise<void> {
      await db.query('INSERT INTO login_failures (username, ip) VALUES ($1, $2)', [username, ip]);
    },

    /** A successful sign-in clears the account's failures (not the IP's). */
    async clearAccount(username: string): Promise<void> {
      await db.query('DELETE FROM login_failures WHERE username = $1', [username]);
    },

    async deleteOlderThan(windowSeconds: number): Promise<void> {
      await db.query('DELETE FROM login_failures WHERE at < now() - make_interval(secs => $1)', [
        windowSeconds,
      ]);
    },
  };
}
