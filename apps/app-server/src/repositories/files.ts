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
    async create(file: Omit<FileRecord, 'createdAt'>): Promise<FileRecord> {
      const { rows } = await db.query<FileRecord>(
        `INSERT INTO files (id, user_id, object_id, name, content_type, size, sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING ${COLUMNS}`,
        [file.id, file.userId, file.objectId, file.name, file.contentType, file.size, file.sha256],
      );
      return rows[0] as FileRecord;
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
