import type { JWK } from 'jose';
import type { Pool } from 'pg';

export type KeyState = 'next' | 'current' | 'previous' | 'revoked';

export interface SigningKeyRecord {
  kid: string;
  alg: string;
  state: KeyState;
  publicJwk: JWK;
  privateKey: string;
  createdAt: Date;
  activatedAt: Date | null;
  retiredAt: Date | null;
}

const COLUMNS = `kid, alg, state, public_jwk AS "publicJwk", private_key AS "privateKey", created_at AS "createdAt",
  activated_at AS "activatedAt", retired_at AS "retiredAt"`;

// Any constant will do; it only has to be the same in every replica.
const KEY_LOCK = 0x6b657973; // 'keys'

export function signingKeysRepository(db: Pool) {
  return {
    async current(): Promise<SigningKeyRecord | undefined> {
      const { rows } = await db.query<SigningKeyRecord>(
        `SELECT ${COLUMNS} FROM signing_keys WHERE state = 'current'`,
      );
      return rows[0];
    },

    /** Keys whose public half is published: every state but revoked. */
    async published(): Promise<SigningKeyRecord[]> {
      const { rows } = await db.query<SigningKeyRecord>(
        `SELECT ${COLUMNS} FROM signing_keys WHERE state <> 'revoked' ORDER BY created_at DESC`,
      );
      return rows;
    },

    /**
     * Makes `create()`'s key current unless there already is a current key; returns the current
     * key either way. An advisory lock serializes replicas starting at once.
     */
    async ensureCurrent(
      create: () => Promise<Omit<SigningKeyRecord, 'state' | 'createdAt' | 'activatedAt' | 'retiredAt'>>,
    ) {
      const client = await db.connect();
      try {
        await client.query('BEGIN');
        await client.query('SELECT pg_advisory_xact_lock($1)', [KEY_LOCK]);
        let { rows } = await client.query<SigningKeyRecord>(
          `SELECT ${COLUMNS} FROM signing_keys WHERE state = 'current'`,
        );
        if (rows.length === 0) {
          const key = await create();
          ({ rows } = await client.query<SigningKeyRecord>(
            `INSERT INTO signing_keys (kid, alg, state, public_jwk, private_key, activated_at)
             VALUES ($1, $2, 'current', $3, $4, now()) RETURNING ${COLUMNS}`,
            [key.kid, key.alg, key.publicJwk, key.privateKey],
          ));
        }
        await client.query('COMMIT');
        return rows[0] as SigningKeyRecord;
      } catch (error) {
        await client.query('ROLLBACK').catch(() => {});
        throw error;
      } finally {
        client.release();
      }
    },
  };
}
