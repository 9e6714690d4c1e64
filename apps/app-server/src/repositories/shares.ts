import type { Pool } from 'pg';
import { type FileRecord, fileColumns } from './files.ts';

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

/** Share links. The owner's reads and writes are scoped to the owner: another user's share does not exist. */
export function sharesRepository(db: Pool) {
  return {
    /** Creates a share of the user's file; `undefined` if the file is not theirs. */
    async create(share: {
      id: string;
      userId: string;
      fileId: string;
      passwordHash: string | null;
      expiresInSeconds: number;
      maxDownloads: number | null;
    }): Promise<ShareRecord | undefined> {
      const { rows } = await db.query<ShareRecord>(
        `WITH s AS (
           INSERT INTO shares (id, file_id, user_id, password_hash, expires_at, max_downloads)
           SELECT $1, id, user_id, $4, now() + make_interval(secs => $5), $6
             FROM files WHERE id = $3 AND user_id = $2
           RETURNING *
         )
         SELECT ${COLUMNS} FROM s JOIN files f ON f.id = s.file_id`,
        [
          share.id,
          share.userId,
          share.fileId,
          share.passwordHash,
          share.expiresInSeconds,
          share.maxDownloads,
        ],
      );
      return rows[0];
    },

    /** The user's shares, newest first, revoked ones included. */
    async listForUser(userId: string): Promise<ShareRecord[]> {
      const { rows } = await db.query<ShareRecord>(
        `SELECT ${COLUMNS} FROM shares s JOIN files f ON f.id = s.file_id
          WHERE s.user_id = $1 ORDER BY s.created_at DESC, s.id`,
        [userId],
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
     * expired, has downloads left, and its owner is within `perMinute` mints this minute (0: no
     * limit; the owner's count is the one their own downloads use). Concurrent calls on any
     * replica queue on the share's row, and Postgres re-checks the limit on the row each one
     * finds: with `maxDownloads` n, exactly n succeed.
     */
    async takeDownload(id: string, perMinute: number): Promise<MintOutcome> {
      const { rows } = await db.query<
        FileRecord & { minted: number | null; retryAfterSeconds: number | null; taken: boolean }
      >({
        name: 'shares.takeDownload',
        text: `WITH share AS (
           SELECT s.*, ${USABLE} AS usable FROM shares s WHERE s.id = $1 AND s.revoked_at IS NULL
         ), counted AS (
           INSERT INTO mint_counts AS c (user_id, window_start, count)
           SELECT user_id, date_trunc('minute', now()), 1 FROM share WHERE usable AND $2::integer > 0
           ON CONFLICT (user_id) DO UPDATE SET
             count = CASE WHEN c.window_start = EXCLUDED.window_start THEN c.count + 1 ELSE 1 END,
             window_start = EXCLUDED.window_start
           RETURNING c.count, c.window_start
         ), taken AS (
           UPDATE shares s SET downloads = s.downloads + 1, last_download_at = now()
            WHERE s.id = $1 AND ${USABLE}
              AND ($2::integer = 0 OR (SELECT count FROM counted) <= $2::integer)
           RETURNING s.id
         )
         SELECT ${fileColumns('f')}, counted.count AS minted,
                ceil(extract(epoch FROM counted.window_start + interval '1 minute' - now()))::integer
                  AS "retryAfterSeconds",
                taken.id IS NOT NULL AS taken
           FROM share JOIN files f ON f.id = share.file_id
           LEFT JOIN counted ON true LEFT JOIN taken ON true`,
        values: [id, perMinute],
      });
      const row = rows[0];
      if (!row) return { outcome: 'not_found' };
      const { minted, retryAfterSeconds, taken, ...file } = row;
      if (taken) return { outcome: 'minted', file };
      if (perMinute > 0 && (minted ?? 0) > perMinute)
        return { outcome: 'rate_limited', retryAfterSeconds: Math.max(1, retryAfterSeconds ?? 60) };
      return { outcome: 'expired' };
    },
  };
}
