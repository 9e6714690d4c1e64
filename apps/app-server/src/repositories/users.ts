import type { Pool } from 'pg';

export interface User {
  id: string;
  username: string;
  createdAt: Date;
}

export interface UserWithHash extends User {
  passwordHash: string;
  /** Bumped by every password change; sessions signed in under an older one are dead. */
  credentialVersion: number;
}

const COLUMNS =
  'id, username, password_hash AS "passwordHash", credential_version AS "credentialVersion", created_at AS "createdAt"';

export function usersRepository(db: Pool) {
  return {
    /** Inserts a user; rejects with Postgres error 23505 if the name is taken (in any case). */
    async create(user: { id: string; username: string; passwordHash: string }): Promise<User> {
      const { rows } = await db.query<UserWithHash>(
        `INSERT INTO users (id, username, password_hash) VALUES ($1, $2, $3) RETURNING ${COLUMNS}`,
        [user.id, user.username, user.passwordHash],
      );
      return withoutHash(rows[0] as UserWithHash);
    },

    async findByUsername(username: string): Promise<UserWithHash | undefined> {
      const { rows } = await db.query<UserWithHash>(
        `SELECT ${COLUMNS} FROM users WHERE lower(username) = lower($1)`,
        [username],
      );
      return rows[0];
    },

    async findById(id: string): Promise<UserWithHash | undefined> {
      const { rows } = await db.query<UserWithHash>(`SELECT ${COLUMNS} FROM users WHERE id = $1`, [id]);
      return rows[0];
    },

    /** Retires every session and device cookie of the user; returns the new credential version. */
    async bumpCredentialVersion(id: string): Promise<number> {
      const { rows } = await db.query<{ version: number }>(
        `UPDATE users SET credential_version = credential_version + 1 WHERE id = $1
         RETURNING credential_version AS version`,
        [id],
      );
      return rows[0]?.version as number;
    },

    /** Sets the new password and returns the new credential version. */
    async setPasswordHash(id: string, passwordHash: string): Promise<number> {
      const { rows } = await db.query<{ version: number }>(
        `UPDATE users SET password_hash = $2, credential_version = credential_version + 1 WHERE id = $1
         RETURNING credential_version AS version`,
        [id, passwordHash],
      );
      return rows[0]?.version as number;
    },
  };
}

export function withoutHash({ passwordHash: _, credentialVersion: __, ...user }: UserWithHash): User {
  return user;
}
