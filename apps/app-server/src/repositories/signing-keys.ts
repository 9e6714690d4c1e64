import type { JWK } from 'jose';
import type { Pool, PoolClient } from 'pg';
import type { NewSigningKey } from '../keys/material.ts';
import { inTransaction } from './transaction.ts';

export type KeyState = 'next' | 'current' | 'previous' | 'revoked';

export interface SigningKeyRecord {
  kid: string;
  alg: string;
  state: KeyState;
  publicJwk: JWK;
  privateKey: string;
  createdAt: Date;
  activatesAt: Date | null;
  activatedAt: Date | null;
  retiredAt: Date | null;
  retiresAt: Date | null;
  revokedAt: Date | null;
}

const COLUMNS = `kid, alg, state, public_jwk AS "publicJwk", private_key AS "privateKey", created_at AS "createdAt",
  activates_at AS "activatesAt", activated_at AS "activatedAt", retired_at AS "retiredAt", retires_at AS "retiresAt",
  revoked_at AS "revokedAt"`;

// Any constant will do; it only has to be the same in every replica and in the CLI.
const KEY_LOCK = 0x6b657973; // 'keys'

type Queryable = Pool | PoolClient;

function keyQueries(db: Queryable) {
  const select = async (where: string, params: unknown[] = []) =>
    (await db.query<SigningKeyRecord>(`SELECT ${COLUMNS} FROM signing_keys ${where}`, params)).rows;
  return {
    /** Every key, revoked ones included, oldest first. */
    list: () => select('ORDER BY created_at, kid'),
    current: async () => (await select(`WHERE state = 'current'`))[0],
    /** The keys whose public half is in the JWKS: next, current and previous. */
    published: () => select(`WHERE state IN ('next', 'current', 'previous') ORDER BY created_at DESC`),

    /** Adds a key: `next` waits until `activatesAt`; `current` signs from `now`. */
    async insert(key: NewSigningKey, state: 'next' | 'current', now: Date, activatesAt: Date) {
      const { rows } = await db.query<SigningKeyRecord>(
        `INSERT INTO signing_keys (kid, alg, state, public_jwk, private_key, created_at, activates_at, activated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $3 = 'current' THEN $6::timestamptz END)
         RETURNING ${COLUMNS}`,
        [key.kid, key.alg, state, key.publicJwk, key.privateKey, now, activatesAt],
      );
      return rows[0] as SigningKeyRecord;
    },

    /** The oldest next key, first in line to sign. `readyBy` set: only one whose time has come. */
    async firstNext(readyBy?: Date) {
      const rows = await select(
        `WHERE state = 'next' ${readyBy ? 'AND activates_at <= $1' : ''} ORDER BY activates_at, created_at LIMIT 1`,
        readyBy ? [readyBy] : [],
      );
      return rows[0];
    },

    /** current → previous (published until `retiresAt`), then `kid` → current. */
    async promote(kid: string, now: Date, retiresAt: Date) {
      await db.query(
        `UPDATE signing_keys SET state = 'previous', retired_at = $1, retires_at = $2 WHERE state = 'current'`,
        [now, retiresAt],
      );
      await db.query(`UPDATE signing_keys SET state = 'current', activated_at = $2 WHERE kid = $1`, [
        kid,
        now,
      ]);
    },

    /** Removes previous keys whose last tokens have expired, but `keepKid`: row and private key are gone. */
    async deleteRetired(now: Date, keepKid?: string) {
      const { rowCount } = await db.query(
        `DELETE FROM signing_keys WHERE state = 'previous' AND retires_at <= $1 AND kid IS DISTINCT FROM $2::text`,
        [now, keepKid ?? null],
      );
      return rowCount ?? 0;
    },

    /** Unpublishes a key at once and destroys its private half; returns its state before. */
    async revoke(kid: string, now: Date) {
      const { rows } = await db.query<{ state: KeyState }>(
        `UPDATE signing_keys k SET state = 'revoked', revoked_at = $2, private_key = ''
           FROM (SELECT state FROM signing_keys WHERE kid = $1 AND state <> 'revoked' FOR UPDATE) old
          WHERE k.kid = $1
         RETURNING old.state`,
        [kid, now],
      );
      return rows[0]?.state;
    },
  };
}

export type KeyQueries = ReturnType<typeof keyQueries>;

export function signingKeysRepository(db: Pool) {
  return {
    ...keyQueries(db),

    /**
     * Runs `fn` in a transaction that holds the key-lifecycle lock, so one process (replica or
     * CLI) changes key states at a time. With `wait: false`, resolves `undefined` at once if
     * another process holds it.
     */
    async locked<T>(fn: (keys: KeyQueries) => Promise<T>, { wait = true } = {}): Promise<T | undefined> {
      return inTransaction(db, async (client) => {
        if (wait) {
          await client.query('SELECT pg_advisory_xact_lock($1)', [KEY_LOCK]);
        } else {
          const { rows } = await client.query<{ ok: boolean }>('SELECT pg_try_advisory_xact_lock($1) AS ok', [
            KEY_LOCK,
          ]);
          if (!rows[0]?.ok) return undefined;
        }
        return fn(keyQueries(client));
      });
    },
  };
}
