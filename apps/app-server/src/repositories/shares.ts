import type { Pool } from 'pg';
import { type FileRecord, fileColumns } from './files.ts';
import { inTransaction } from './transaction.ts';

export interface ShareRecord {
  id: string;
  fileId: string;
  userId: string;
  fileName: string;
  expiresAt: Date;
  maxDownloads: number | null;
  downloads: number;
  lastDownloadAt: Date | null;
  hasPassword: boolean;
  createdAt: Date;
  revokedAt: Date | null;
  /** Wrong passwords within the throttling window (only in the owner's list). */
  recentFailures?: number;
}

/** A live share (not revoked, its file still there) as the public page needs it. */
export interface PublicShare extends ShareRecord {
  fileSize: number;
  passwordHash: string | null;
}

const COLUMNS = `s.id, s.file_id AS "fileId", s.user_id AS "userId", f.name AS "fileName",
  s.expires_at AS "expiresAt", s.max_downloads AS "maxDownloads", s.downloads,
  s.last_download_at AS "lastDownloadAt", s.password_hash IS NOT NULL AS "hasPassword",
  s.created_at AS "createdAt", s.revoked_at AS "revokedAt"`;

// A share may mint while it is not revoked, has not expired and has downloads left.
const USABLE = `s.revoked_at IS NULL AND s.expires_at > now()
  AND (s.max_downloads IS NULL OR s.downloads < s.max_downloads)`;

export type MintOutcome =
  | { outcome: 'minted'; file: FileRecord }
  | { outcome: 'not_found' }
  | { outcome: 'expired' }
  | { outcome: 'rate_limited'; retryAfterSeconds: number };

export type CreateOutcome =
  | { outcome: 'created'; share: ShareRecord }
  | { outcome: 'not_found' }
  | { outcome: 'too_many'; per: 'user' | 'file'; limit: number };

/** Attempts in a sliding window, and when the oldest of each count leaves it. */
export interface WindowCounts {
  id: string;
  /** Of the share (password failures) or of the user (creations), this attempt included. */
  subject: number;
  /** Of the client IP (for that share, for password failures), this attempt included. */
  client: number;
  subjectFreeAt: Date;
  clientFreeAt: Date;
}

// Mints per minute, one row per key: the upsert starts a new minute at 1 and otherwise adds one.
// Nothing is counted when the limit (`limit`, a parameter) is 0, or when the share cannot mint.
const countThisMinute = (table: string, key: string, limit: string) => `
  INSERT INTO ${table} AS c (${key}, window_start, count)
  SELECT ${key}, date_trunc('minute', now()), 1 FROM share WHERE usable AND ${limit}::integer > 0
  ON CONFLICT (${key}) DO UPDATE SET
    count = CASE WHEN c.window_start = EXCLUDED.window_start THEN c.count + 1 ELSE 1 END,
    window_start = EXCLUDED.window_start
  RETURNING c.count`;

/** Share links. The owner's reads and writes are scoped to the owner: another user's share does not exist. */
export function sharesRepository(db: Pool) {
  return {
    /**
     * Creates a share of the user's file, unless the user already has `caps.perUser` live
     * shares (not revoked, not expired, downloads left), or the file `caps.perFile`. The count
     * and the insert hold the user's row, so concurrent creations on any replica cannot together
     * pass a cap. `not_found` if the file is not theirs.
     */
    async create(
      share: {
        id: string;
        userId: string;
        fileId: string;
        passwordHash: string | null;
        expiresInSeconds: number;
        maxDownloads: number | null;
      },
      caps: { perUser: number; perFile: number },
    ): Promise<CreateOutcome> {
      const created = inTransaction<CreateOutcome>(db, async (client) => {
        await client.query('SELECT 1 FROM users WHERE id = $1 FOR UPDATE', [share.userId]);
        const { rows: counts } = await client.query<{ owned: boolean; user: number; file: number }>(
          `SELECT EXISTS (SELECT 1 FROM files WHERE id = $2 AND user_id = $1) AS owned,
                  count(*)::int AS user, (count(*) FILTER (WHERE s.file_id = $2))::int AS file
             FROM shares s WHERE s.user_id = $1 AND ${USABLE}`,
          [share.userId, share.fileId],
        );
        const { owned, user, file } = counts[0] as NonNullable<(typeof counts)[0]>;
        if (!owned) return { outcome: 'not_found' };
        if (user >= caps.perUser) return { outcome: 'too_many', per: 'user', limit: caps.perUser };
        if (file >= caps.perFile) return { outcome: 'too_many', per: 'file', limit: caps.perFile };
        const { rows } = await client.query<ShareRecord>(
          `WITH s AS (
             INSERT INTO shares (id, file_id, user_id, password_hash, expires_at, max_downloads)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6)
             RETURNING *
           )
           SELECT ${COLUMNS} FROM s JOIN files f ON f.id = s.file_id`,
          [
            share.id,
            share.fileId,
            share.userId,
            share.passwordHash,
            share.expiresInSeconds,
            share.maxDownloads,
          ],
        );
        return { outcome: 'created', share: rows[0] as ShareRecord };
      });
      // The file deleted between the check and the insert: not theirs any more.
      return created.catch((error: { code?: string }) => {
        if (error.code === '23503') return { outcome: 'not_found' };
        throw error;
      });
    },

    /**
     * Records a share creation by the user from `ip` and counts those within the window, this
     * one included. Recorded (and committed) before it is counted, so of concurrent creations
     * on any replica, the last to count sees all the others: they cannot all pass.
     */
    async recordCreation(userId: string, ip: string, windowSeconds: number): Promise<WindowCounts> {
      const { rows: added } = await db.query<{ id: string }>(
        'INSERT INTO share_creations (user_id, ip) VALUES ($1, $2) RETURNING id',
        [userId, ip],
      );
      const { rows } = await db.query<Omit<WindowCounts, 'id'>>(
        `SELECT count(*) FILTER (WHERE user_id = $1)::int AS subject,
                count(*) FILTER (WHERE ip = $2)::int AS client,
                min(at) FILTER (WHERE user_id = $1) + make_interval(secs => $3) AS "subjectFreeAt",
                min(at) FILTER (WHERE ip = $2) + make_interval(secs => $3) AS "clientFreeAt"
           FROM share_creations
          WHERE (user_id = $1 OR ip = $2) AND at > now() - make_interval(secs => $3)`,
        [userId, ip, windowSeconds],
      );
      return { id: added[0]?.id as string, ...(rows[0] as Omit<WindowCounts, 'id'>) };
    },

    /** Forgets a creation that was refused, so that refusals do not extend the wait. */
    async removeCreation(id: string): Promise<void> {
      await db.query('DELETE FROM share_creations WHERE id = $1', [id]);
    },

    /**
     * Records a password attempt on the share from `ip` (a failure until `removePasswordAttempt`)
     * and counts the share's failures within the window, and those from `ip`, this one included.
     * Recorded before it is counted, as above: concurrent guesses cannot all pass.
     */
    async recordPasswordAttempt(shareId: string, ip: string, windowSeconds: number): Promise<WindowCounts> {
      const { rows: added } = await db.query<{ id: string }>(
        'INSERT INTO share_password_failures (share_id, ip) VALUES ($1, $2) RETURNING id',
        [shareId, ip],
      );
      const { rows } = await db.query<Omit<WindowCounts, 'id'>>(
        `SELECT count(*)::int AS subject, count(*) FILTER (WHERE ip = $2)::int AS client,
                min(at) + make_interval(secs => $3) AS "subjectFreeAt",
                min(at) FILTER (WHERE ip = $2) + make_interval(secs => $3) AS "clientFreeAt"
           FROM share_password_failures
          WHERE share_id = $1 AND at > now() - make_interval(secs => $3)`,
        [shareId, ip, windowSeconds],
      );
      return { id: added[0]?.id as string, ...(rows[0] as Omit<WindowCounts, 'id'>) };
    },

    /** A right password, or a refused attempt: it counts for nothing. */
    async removePasswordAttempt(id: string): Promise<void> {
      await db.query('DELETE FROM share_password_failures WHERE id = $1', [id]);
    },

    /** Drops password failures and creations older than their windows: they count for nothing. */
    async deleteOlderThan(passwordWindowSeconds: number, creationWindowSeconds: number): Promise<void> {
      await db.query('DELETE FROM share_password_failures WHERE at < now() - make_interval(secs => $1)', [
        passwordWindowSeconds,
      ]);
      await db.query('DELETE FROM share_creations WHERE at < now() - make_interval(secs => $1)', [
        creationWindowSeconds,
      ]);
    },

    /**
     * The user's shares, newest first, revoked ones included, each with its wrong passwords
     * within the last `windowSeconds` (a share under attack shows).
     */
    async listForUser(userId: string, windowSeconds: number): Promise<ShareRecord[]> {
      const { rows } = await db.query<ShareRecord>(
        `SELECT ${COLUMNS},
                (SELECT count(*) FROM share_password_failures p
                  WHERE p.share_id = s.id AND p.at > now() - make_interval(secs => $2))::int AS "recentFailures"
           FROM shares s JOIN files f ON f.id = s.file_id
          WHERE s.user_id = $1 ORDER BY s.created_at DESC, s.id`,
        [userId, windowSeconds],
      );
      return rows;
    },

    /** Revokes the user's share (again is fine); `false` if there is no such share of theirs. */
    async revokeForUser(userId: string, id: string): Promise<boolean> {
      const { rowCount } = await db.query(
        'UPDATE shares SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND user_id = $2',
        [id, userId],
      );
      return (rowCount ?? 0) > 0;
    },

    /** A share that is not revoked and whose file exists (expired or used up ones included). */
    async findLive(id: string): Promise<PublicShare | undefined> {
      const { rows } = await db.query<PublicShare>(
        `SELECT ${COLUMNS}, f.size AS "fileSize", s.password_hash AS "passwordHash"
           FROM shares s JOIN files f ON f.id = s.file_id
          WHERE s.id = $1 AND s.revoked_at IS NULL`,
        [id],
      );
      return rows[0];
    },

    /**
     * Takes one download of the share, in one statement: the share is not revoked, has not
     * expired, has downloads left, and is within its own budget of mints this minute
     * (`limits.perShare`) and within its owner's budget for all their shares (`limits.perOwner`;
     * 0: no limit). Those budgets are apart from the owner's own MINT_RATE_PER_MINUTE, which the
     * public never spends. Concurrent calls on any replica queue on the counts' and the share's
     * rows, and Postgres re-checks the limit on the row each one finds: with `maxDownloads` n,
     * exactly n succeed.
     */
    async takeDownload(id: string, limits: { perShare: number; perOwner: number }): Promise<MintOutcome> {
      const { rows } = await db.query<
        FileRecord & {
          shareMinted: number | null;
          ownerMinted: number | null;
          retryAfterSeconds: number;
          taken: boolean;
        }
      >({
        name: 'shares.takeDownload',
        text: `WITH share AS (
           SELECT s.id AS share_id, s.user_id, s.file_id, ${USABLE} AS usable
             FROM shares s WHERE s.id = $1 AND s.revoked_at IS NULL
         ), share_counted AS (${countThisMinute('share_mint_counts', 'share_id', '$2')}
         ), owner_counted AS (${countThisMinute('share_owner_mint_counts', 'user_id', '$3')}
         ), taken AS (
           UPDATE shares s SET downloads = s.downloads + 1, last_download_at = now()
            WHERE s.id = $1 AND ${USABLE}
              AND ($2::integer = 0 OR (SELECT count FROM share_counted) <= $2::integer)
              AND ($3::integer = 0 OR (SELECT count FROM owner_counted) <= $3::integer)
           RETURNING s.id
         )
         SELECT ${fileColumns('f')}, share_counted.count AS "shareMinted", owner_counted.count AS "ownerMinted",
                ceil(extract(epoch FROM date_trunc('minute', now()) + interval '1 minute' - now()))::integer
                  AS "retryAfterSeconds",
                taken.id IS NOT NULL AS taken
           FROM share JOIN files f ON f.id = share.file_id
           LEFT JOIN share_counted ON true LEFT JOIN owner_counted ON true LEFT JOIN taken ON true`,
        values: [id, limits.perShare, limits.perOwner],
      });
      const row = rows[0];
      if (!row) return { outcome: 'not_found' };
      const { shareMinted, ownerMinted, retryAfterSeconds, taken, ...file } = row;
      if (taken) return { outcome: 'minted', file };
      const over = (minted: number | null, limit: number) => limit > 0 && (minted ?? 0) > limit;
      if (over(shareMinted, limits.perShare) || over(ownerMinted, limits.perOwner))
        return { outcome: 'rate_limited', retryAfterSeconds: Math.max(1, retryAfterSeconds) };
      return { outcome: 'expired' };
    },
  };
}
