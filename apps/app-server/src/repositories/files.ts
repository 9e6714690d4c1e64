import type { Pool } from 'pg';
import { StorageUnavailable } from '../errors.ts';
import { inTransaction } from './transaction.ts';

export interface FileRecord {
  id: string;
  userId: string;
  objectId: string;
  name: string;
  contentType: string;
  size: number;
  sha256: string;
  createdAt: Date;
}

/** The columns of a `FileRecord`, from the `files` row called `table` in a query. */
export const fileColumns = (table: string) =>
  `${table}.id, ${table}.user_id AS "userId", ${table}.object_id AS "objectId", ${table}.name,
  ${table}.content_type AS "contentType", ${table}.size, ${table}.sha256, ${table}.created_at AS "createdAt"`;
const COLUMNS = fileColumns('files');

// The bytes a user has taken: stored files, plus the live reservations of uploads in progress.
const committedBytes = (user: string) =>
  `((SELECT coalesce(sum(size), 0) FROM files WHERE user_id = ${user}) +
    (SELECT coalesce(sum(bytes), 0) FROM upload_reservations WHERE user_id = ${user} AND expires_at > now()))`;

/** File metadata. Every read and delete is scoped to the owner: another user's file does not exist. */
export function filesRepository(db: Pool) {
  return {
    /** Bytes the user stores in all. */
    async usedBytes(userId: string): Promise<number> {
      const { rows } = await db.query<{ used: number }>(
        'SELECT coalesce(sum(size), 0)::bigint AS used FROM files WHERE user_id = $1',
        [userId],
      );
      return rows[0]?.used ?? 0;
    },

    /**
     * Reserves up to `wantedBytes` of the user's quota for an upload that starts now, so that
     * concurrent uploads cannot together write more than the quota to disk: what the user
     * stores plus what other uploads in progress reserved is taken first. Returns the
     * reservation (its bytes may be fewer than wanted), or `undefined` when nothing is left.
     * A reservation lapses after `ttlSeconds` (a replica that crashed mid-upload).
     */
    async reserve(
      userId: string,
      wantedBytes: number,
      quotaBytes: number,
      ttlSeconds: number,
    ): Promise<{ id: string; bytes: number } | undefined> {
      return inTransaction(db, async (client) => {
        await client.query('SELECT 1 FROM users WHERE id = $1 FOR UPDATE', [userId]);
        // Lapsed reservations (of a replica that crashed mid-upload) go here, user by user.
        await client.query('DELETE FROM upload_reservations WHERE user_id = $1 AND expires_at <= now()', [
          userId,
        ]);
        const { rows } = await client.query<{ id: string; bytes: number }>(
          `INSERT INTO upload_reservations (user_id, bytes, expires_at)
           SELECT $1, granted, now() + make_interval(secs => $4)
             FROM (SELECT least($2::bigint, $3::bigint - ${committedBytes('$1')}) AS granted) AS g
            WHERE granted > 0
           RETURNING id, bytes`,
          [userId, wantedBytes, quotaBytes, ttlSeconds],
        );
        return rows[0];
      });
    },

    /** Gives a reservation's bytes back (the upload failed, or its file row holds them now). */
    async release(reservationId: string): Promise<void> {
      await db.query('DELETE FROM upload_reservations WHERE id = $1', [reservationId]);
    },

    /**
     * Inserts the file unless it takes the user's total, with the other uploads' reservations,
     * over `quotaBytes` (0: no quota); then returns `undefined`. The user's row is locked
     * meanwhile, so concurrent uploads cannot both squeeze in. The upload's own reservation
     * (`reservationId`) and its object's entry in the delete outbox go in the same transaction.
     * Rejects with `STORAGE_UNAVAILABLE` (inserting nothing) when that entry is no longer there
     * untouched: a sweep has claimed the object (the upload outlived its due time), so a row would
     * point at bytes about to go.
     */
    async createWithinQuota(
      file: Omit<FileRecord, 'createdAt'>,
      quotaBytes: number,
      reservationId: string | null,
    ): Promise<FileRecord | undefined> {
      return inTransaction(db, async (client) => {
        await client.query('SELECT 1 FROM users WHERE id = $1 FOR UPDATE', [file.userId]);
        if (reservationId)
          await client.query('DELETE FROM upload_reservations WHERE id = $1', [reservationId]);
        const { rows } = await client.query<FileRecord>(
          `INSERT INTO files (id, user_id, object_id, name, content_type, size, sha256)
           SELECT $1, $2, $3, $4, $5, $6::bigint, $7
            WHERE $8::bigint = 0 OR ${committedBytes('$2')} + $6::bigint <= $8::bigint
           RETURNING ${COLUMNS}`,
          [
            file.id,
            file.userId,
            file.objectId,
            file.name,
            file.contentType,
            file.size,
            file.sha256,
            quotaBytes,
          ],
        );
        if (!rows[0]) return undefined;
        // Not yet tried by a sweep (attempts 0): a sweep that claims it first makes this wait for
        // its update and then find nothing; one that comes later skips the locked entry.
        const { rowCount } = await client.query(
          'DELETE FROM object_deletions WHERE object_id = $1 AND attempts = 0',
          [file.objectId],
        );
        if (rowCount !== 1)
          throw new StorageUnavailable({
            cause: new Error(`object ${file.objectId} was claimed by the delete sweep before its row`),
          });
        return rows[0];
      });
    },

    async listForUser(userId: string): Promise<FileRecord[]> {
      const { rows } = await db.query<FileRecord>(
        `SELECT ${COLUMNS} FROM files WHERE user_id = $1 ORDER BY created_at DESC, id`,
        [userId],
      );
      return rows;
    },

    async findForUser(userId: string, id: string): Promise<FileRecord | undefined> {
      const { rows } = await db.query<FileRecord>(
        `SELECT ${COLUMNS} FROM files WHERE id = $1 AND user_id = $2`,
        [id, userId],
      );
      return rows[0];
    },

    /**
     * The user's file for a download token, and in the same statement (one round trip), the
     * mint counted against the user's limit for the current minute: how many this minute so far,
     * this one included, and the seconds until the next minute. With `perMinute` 0 nothing is
     * counted (`minted` 0). No file, no count.
     */
    async findForMint(
      userId: string,
      id: string,
      perMinute: number,
    ): Promise<{ file: FileRecord; minted: number; retryAfterSeconds: number } | undefined> {
      // A named statement: on every mint, so Postgres plans it once per connection.
      const { rows } = await db.query<
        FileRecord & { minted: number | null; retryAfterSeconds: number | null }
      >({
        name: 'files.findForMint',
        text: `WITH file AS (
           SELECT ${COLUMNS} FROM files WHERE id = $1 AND user_id = $2
         ), counted AS (
           INSERT INTO mint_counts AS c (user_id, window_start, count)
           SELECT $2, date_trunc('minute', now()), 1 FROM file WHERE $3::integer > 0
           ON CONFLICT (user_id) DO UPDATE SET
             count = CASE WHEN c.window_start = EXCLUDED.window_start THEN c.count + 1 ELSE 1 END,
             window_start = EXCLUDED.window_start
           RETURNING c.count, c.window_start
         )
         SELECT file.*, counted.count AS minted,
                ceil(extract(epoch FROM counted.window_start + interval '1 minute' - now()))::integer
                  AS "retryAfterSeconds"
           FROM file LEFT JOIN counted ON true`,
        values: [id, userId, perMinute],
      });
      const row = rows[0];
      if (!row) return undefined;
      const { minted, retryAfterSeconds, ...file } = row;
      return { file, minted: minted ?? 0, retryAfterSeconds: retryAfterSeconds ?? 0 };
    },

    /** Deletes the row and returns it, so the caller can remove the bytes. */
    async deleteForUser(userId: string, id: string): Promise<FileRecord | undefined> {
      const { rows } = await db.query<FileRecord>(
        `DELETE FROM files WHERE id = $1 AND user_id = $2 RETURNING ${COLUMNS}`,
        [id, userId],
      );
      return rows[0];
    },
  };
}
