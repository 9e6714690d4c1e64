import type { Pool } from 'pg';

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

const COLUMNS = `id, user_id AS "userId", object_id AS "objectId", name, content_type AS "contentType", size, sha256,
  created_at AS "createdAt"`;

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
     * Inserts the file unless it takes the user's total over `quotaBytes` (0: no quota); then
     * returns `undefined`. The user's row is locked meanwhile, so concurrent uploads cannot
     * both squeeze in.
     */
    async createWithinQuota(
      file: Omit<FileRecord, 'createdAt'>,
      quotaBytes: number,
    ): Promise<FileRecord | undefined> {
      const client = await db.connect();
      try {
        await client.query('BEGIN');
        await client.query('SELECT 1 FROM users WHERE id = $1 FOR UPDATE', [file.userId]);
        const { rows } = await client.query<FileRecord>(
          `INSERT INTO files (id, user_id, object_id, name, content_type, size, sha256)
           SELECT $1, $2, $3, $4, $5, $6::bigint, $7
            WHERE $8::bigint = 0 OR (SELECT coalesce(sum(size), 0) FROM files WHERE user_id = $2) + $6::bigint <= $8::bigint
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
        await client.query('COMMIT');
        return rows[0];
      } catch (error) {
        await client.query('ROLLBACK').catch(() => {});
        throw error;
      } finally {
        client.release();
      }
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
