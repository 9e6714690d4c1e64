import { createHash } from 'node:crypto';
import type { SessionStore } from '@fastify/session';
import type { Session } from 'fastify';
import { fromDatabaseError } from './errors.ts';
import type { Repositories } from './plugins/repositories.ts';
import { storableText } from './text.ts';

type Callback = (error?: unknown) => void;

/** The database key of a session id: its SHA-256, so the table alone never yields a usable cookie. */
export const hashSessionId = (sessionId: string) =>
  createHash('sha256').update(sessionId).digest('base64url');

// Recording every request's time would turn each read into a write; a minute is precise enough
// for "last seen", and half the idle timeout at most keeps an active session alive.
const TOUCH_AFTER_MS = 60_000;

export interface SessionTimeouts {
  idleSeconds: number;
  absoluteSeconds: number;
}

/**
 * An anonymous session (a message for the next page, after a failed sign-in) lives this long at
 * most: anyone can make one, and such rows must not pile up for days. (A form's CSRF token needs
 * none: before sign-in it is bound to a cookie, plugins/session.ts.)
 */
export const ANONYMOUS_SESSION_SECONDS = 3600;

/** How long a session row lives: the absolute timeout once signed in, an hour before. */
export const sessionLifetimeSeconds = (timeouts: SessionTimeouts, signedIn: boolean) =>
  signedIn
    ? timeouts.absoluteSeconds
    : Math.min(ANONYMOUS_SESSION_SECONDS, timeouts.idleSeconds, timeouts.absoluteSeconds);

/**
 * @fastify/session store on Postgres.
 *
 * - `get` yields the session only while it is alive: not revoked, used within the idle timeout,
 *   younger than the absolute timeout. Otherwise nothing (the request is anonymous).
 * - `set` creates or updates it; the absolute timeout counts from creation (sign-in), and an
 *   anonymous session ends `ANONYMOUS_SESSION_SECONDS` after it began. A revoked session is
 *   never written back, whatever request was still in flight.
 * - `destroy` revokes it at once, for every replica.
 *
 * Failures reach fastify as catalogue errors (`DATABASE_UNAVAILABLE`, or `INTERNAL` with the
 * cause). A failed save is marked `sessionNotSaved`: it happens in `onSend`, and the error
 * handler must answer without saving the session again.
 */
export class PgSessionStore implements SessionStore {
  readonly #sessions: Repositories['sessions'];
  readonly #timeouts: SessionTimeouts;

  constructor(sessions: Repositories['sessions'], timeouts: SessionTimeouts) {
    this.#sessions = sessions;
    this.#timeouts = timeouts;
  }

  get(sessionId: string, callback: (error: unknown, session?: Session | null) => void): void {
    const idHash = hashSessionId(sessionId);
    this.#sessions
      .get(idHash, this.#timeouts.idleSeconds)
      .then(async (row) => {
        const touchAfterMs = Math.min(TOUCH_AFTER_MS, (this.#timeouts.idleSeconds * 1000) / 2);
        if (row && Date.now() - row.lastSeenAt.getTime() > touchAfterMs) await this.#sessions.touch(idHash);
        return row ? (row.data as unknown as Session) : null;
      })
      .then(
        (session) => callback(null, session),
        (error: unknown) => callback(fromDatabaseError(error)),
      );
  }

  set(sessionId: string, session: Session, callback: Callback): void {
    // Strings in a session come from clients (the User-Agent, a username kept for a form): what
    // Postgres cannot store must not turn the response into a 500 when it is saved.
    const data = JSON.parse(JSON.stringify(session), (_key, value) =>
      typeof value === 'string' ? storableText(value) : value,
    ) as Record<string, unknown>;
    const lifetime = sessionLifetimeSeconds(this.#timeouts, Boolean(session.userId));
    const expiresAt = new Date(Date.now() + lifetime * 1000);
    this.#sessions.upsert(hashSessionId(sessionId), { userId: session.userId ?? null, data, expiresAt }).then(
      () => callback(),
      (error: unknown) => callback(Object.assign(fromDatabaseError(error), { sessionNotSaved: true })),
    );
  }

  destroy(sessionId: string, callback: Callback): void {
    this.#sessions.revoke(hashSessionId(sessionId)).then(
      () => callback(),
      (error: unknown) => callback(fromDatabaseError(error)),
    );
  }
}
