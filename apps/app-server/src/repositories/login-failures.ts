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
        `SELECT count(*) FILTER (WHERE username = $1 AND NOT cleared)::int AS account,
                count(*) FILTER (WHERE ip = $2)::int AS client,
                min(at) FILTER (WHERE username = $1 AND NOT cleared) + make_interval(secs => $3) AS "accountFreeAt",
                min(at) FILTER (WHERE ip = $2) + make_interval(secs => $3) AS "clientFreeAt"
           FROM login_failures
          WHERE (username = $1 OR ip = $2) AND at > now() - make_interval(secs => $3)`,
        [username, ip, windowSeconds],
      );
      return rows[0] as NonNullable<(typeof rows)[0]>;
    },

    /** Records an attempt (a failure until `remove`d); returns its id. */
    async record(username: string, ip: string): Promise<string> {
      const { rows } = await db.query<{ id: string }>(
        'INSERT INTO login_failures (username, ip) VALUES ($1, $2) RETURNING id',
        [username, ip],
      );
      return rows[0]?.id as string;
    },

    async remove(id: string): Promise<void> {
      await db.query('DELETE FROM login_failures WHERE id = $1', [id]);
    },

    /** A successful sign-in clears the account's failures; they still count for their IPs. */
    async clearAccount(username: string): Promise<void> {
      await db.query('UPDATE login_failures SET cleared = true WHERE username = $1 AND NOT cleared', [
        username,
      ]);
    },

    async deleteOlderThan(windowSeconds: number): Promise<void> {
      await db.query('DELETE FROM login_failures WHERE at < now() - make_interval(secs => $1)', [
        windowSeconds,
      ]);
    },
  };
}
