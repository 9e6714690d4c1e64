import type { Session } from 'fastify';
import { describe, expect, it } from 'vitest';
import { PgSessionStore } from '../src/session-store.ts';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count } from './test-utils.ts';

const db = useTestDatabase();

const DAY_MS = 24 * 3600 * 1000;

/** The store's callback API as promises. */
function promised(store: PgSessionStore) {
  return {
    get: (id: string) =>
      new Promise<Session | null | undefined>((resolve, reject) =>
        store.get(id, (error, session) => (error ? reject(error) : resolve(session))),
      ),
    set: (id: string, session: Session) =>
      new Promise<void>((resolve, reject) =>
        store.set(id, session, (error) => (error ? reject(error) : resolve())),
      ),
    destroy: (id: string) =>
      new Promise<void>((resolve, reject) =>
        store.destroy(id, (error) => (error ? reject(error) : resolve())),
      ),
  };
}

const sessionId = () => `test-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;

/** A session as @fastify/session hands it to the store (its JSON form is what gets stored). */
const session = (fields: Record<string, unknown>, expires = new Date(Date.now() + DAY_MS)) =>
  ({
    cookie: { expires, originalMaxAge: expires.getTime() - Date.now(), path: '/', httpOnly: true },
    ...fields,
  }) as unknown as Session;

async function setup() {
  const { app } = await buildTestApp(db());
  const store = promised(
    new PgSessionStore(app.repos.sessions, { idleSeconds: DAY_MS / 1000, absoluteSeconds: DAY_MS / 1000 }),
  );
  return { app, store };
}

describe('PgSessionStore', () => {
  it('gives back what was set', async () => {
    const { app, store } = await setup();
    const user = await new TestClient(app).register();
    const rows = await count(app, 'sessions WHERE revoked_at IS NULL AND user_id = $1', [user.id]);
    const id = sessionId();
    await store.set(id, session({ userId: user.id, _csrf: 'secret', nested: { a: [1, 2] } }));

    const got = await store.get(id);
    expect(got).toMatchObject({ userId: user.id, _csrf: 'secret', nested: { a: [1, 2] } });
    expect(got?.cookie).toBeDefined();
    expect(await count(app, 'sessions WHERE revoked_at IS NULL AND user_id = $1', [user.id])).toBe(rows + 1);

    // A second set overwrites the same row.
    await store.set(id, session({ userId: user.id, _csrf: 'other' }));
    expect(await store.get(id)).toMatchObject({ userId: user.id, _csrf: 'other' });
    expect(await count(app, 'sessions WHERE revoked_at IS NULL AND user_id = $1', [user.id])).toBe(rows + 1);
  });

  it('stores anonymous sessions', async () => {
    const { store } = await setup();
    const id = sessionId();
    await store.set(id, session({ _csrf: 'anonymous' }));
    const got = await store.get(id);
    expect(got).toMatchObject({ _csrf: 'anonymous' });
    expect(got?.userId).toBeUndefined();
  });

  it('answers null for an unknown id', async () => {
    const { store } = await setup();
    expect(await store.get(sessionId())).toBeNull();
  });

  it('forgets a destroyed session', async () => {
    const { app, store } = await setup();
    const id = sessionId();
    const other = sessionId();
    await store.set(id, session({ _csrf: 'a' }));
    await store.set(other, session({ _csrf: 'b' }));
    const rows = await count(app, 'sessions WHERE revoked_at IS NULL');
    await store.destroy(id);
    expect(await store.get(id)).toBeNull();
    expect(await count(app, 'sessions WHERE revoked_at IS NULL')).toBe(rows - 1);
    expect(await store.get(other)).toMatchObject({ _csrf: 'b' });
    // Destroying what is not there is fine.
    await store.destroy(id);
    await store.destroy(sessionId());
  });

  it('answers null for a session past its idle or its absolute timeout', async () => {
    const { app, store } = await setup();
    const idle = sessionId();
    const old = sessionId();
    await store.set(idle, session({ _csrf: 'idle' }));
    await store.set(old, session({ _csrf: 'old' }));
    // Unused for longer than the idle timeout (a day here).
    await app.db.query(
      `UPDATE sessions SET last_seen_at = now() - interval '25 hours' WHERE data->>'_csrf' = 'idle'`,
    );
    // Signed in longer ago than the absolute timeout, however active.
    await app.db.query(
      `UPDATE sessions SET expires_at = now() - interval '1 second' WHERE data->>'_csrf' = 'old'`,
    );
    expect(await store.get(idle)).toBeNull();
    expect(await store.get(old)).toBeNull();
  });

  it('never writes back a destroyed session (a request in flight during logout)', async () => {
    const { store } = await setup();
    const id = sessionId();
    await store.set(id, session({ _csrf: 'a' }));
    await store.destroy(id);
    await store.set(id, session({ _csrf: 'a', later: true }));
    expect(await store.get(id)).toBeNull();
  });

  it('keys rows by something other than the id', async () => {
    const { app, store } = await setup();
    const before = new Set(
      (await app.db.query<{ id_hash: string }>('SELECT id_hash FROM sessions')).rows.map((r) => r.id_hash),
    );
    const id = sessionId();
    await store.set(id, session({ _csrf: 'x' }));
    const { rows } = await app.db.query<{ id_hash: string; data: string }>(
      'SELECT id_hash, data::text AS data FROM sessions',
    );
    const added = rows.filter((row) => !before.has(row.id_hash));
    expect(added).toHaveLength(1);
    expect(added[0]?.id_hash).not.toBe(id);
    expect(added[0]?.id_hash).not.toContain(id);
    expect(added[0]?.data).not.toContain(id);
  });
});
