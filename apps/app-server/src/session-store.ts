import { createHash } from 'node:crypto';
import type { SessionStore } from '@fastify/session';
import type { Session } from 'fastify';
import type { Repositories } from './plugins/repositories.ts';

type Callback = (error?: unknown) => void;

const hashId = (sessionId: string) => createHash('sha256').update(sessionId).digest('base64url');

/**
 * @fastify/session store on Postgres. Rows are keyed by the SHA-256 of the session id, so the
 * table alone never yields a usable cookie.
 *
 * - `get` yields the session, or nothing if it does not exist or has expired.
 * - `set` writes the whole session; its expiry is the cookie's.
 * - `destroy` removes it; the id is dead from then on for every replica.
 */
export class PgSessionStore implements SessionStore {
  readonly #sessions: Repositories['sessions'];
  readonly #maxAgeMs: number;

  constructor(sessions: Repositories['sessions'], maxAgeMs: number) {
    this.#sessions = sessions;
    this.#maxAgeMs = maxAgeMs;
  }

  get(sessionId: string, callback: (error: unknown, session?: Session | null) => void): void {
    this.#sessions.get(hashId(sessionId)).then(
      (row) => callback(null, row ? (row.data as unknown as Session) : null),
      (error) => callback(error),
    );
  }

  set(sessionId: string, session: Session, callback: Callback): void {
    const expires = session.cookie.expires ?? new Date(Date.now() + this.#maxAgeMs);
    const data = JSON.parse(JSON.stringify(session)) as Record<string, unknown>;
    this.#sessions
      .upsert(hashId(sessionId), { userId: session.userId ?? null, data, expiresAt: new Date(expires) })
      .then(() => callback(), callback);
  }

  destroy(sessionId: string, callback: Callback): void {
    this.#sessions.delete(hashId(sessionId)).then(() => callback(), callback);
  }
}
