import { randomUUID } from 'node:crypto';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse, Session } from 'fastify';
import { describe, expect, it } from 'vitest';
import { hashSessionId, PgSessionStore } from '../src/session-store.ts';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError, sessionIdOf, setCookie, setCookies, username } from './test-utils.ts';

const db = useTestDatabase();

const PASSWORD = 'correct horse battery';
const CHROME_ON_WINDOWS =
  'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36';
const FIREFOX_ON_LINUX = 'Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0';
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

interface SessionView {
  id: string;
  current: boolean;
  device: string;
  ip: string | null;
  createdAt: string;
  lastSeenAt: string;
}

/** A browser: every request carries its User-Agent. */
class Browser extends TestClient {
  constructor(
    app: FastifyInstance,
    readonly userAgent: string,
  ) {
    super(app);
  }

  override request(options: InjectOptions & { csrf?: boolean }): Promise<LightMyRequestResponse> {
    return super.request({
      ...options,
      headers: { 'user-agent': this.userAgent, ...(options.headers as Record<string, string>) },
    });
  }
}

async function login(client: TestClient, name: string, password = PASSWORD) {
  return client.request({ method: 'POST', url: '/api/auth/login', payload: { username: name, password } });
}

async function signedInTwice(app: FastifyInstance) {
  const chrome = new Browser(app, CHROME_ON_WINDOWS);
  const user = await chrome.register(username(), PASSWORD);
  const firefox = new Browser(app, FIREFOX_ON_LINUX);
  expect((await login(firefox, user.username)).statusCode).toBe(200);
  return { chrome, firefox, user };
}

async function sessionsOf(client: TestClient): Promise<SessionView[]> {
  const response = await client.request({ method: 'GET', url: '/api/sessions' });
  expect(response.statusCode).toBe(200);
  return response.json<{ sessions: SessionView[] }>().sessions;
}

const currentOf = async (client: TestClient) => {
  const current = (await sessionsOf(client)).filter((s) => s.current);
  expect(current).toHaveLength(1);
  return current[0] as SessionView;
};

const meStatus = async (client: TestClient) =>
  (await client.request({ method: 'GET', url: '/api/me' })).statusCode;

/** The sid cookie value a client holds. */
const cookieOf = (client: TestClient) => {
  const cookie = client.cookies.get('sid');
  expect(cookie).toBeDefined();
  return cookie as string;
};

/** The database key of the session behind a cookie value. */
const idHashOf = (cookie: string) => hashSessionId(sessionIdOf(cookie));

const me = (app: FastifyInstance, cookie: string) =>
  app.inject({ method: 'GET', url: '/api/me', headers: { cookie: `sid=${cookie}` } });

describe('GET /api/sessions', () => {
  it("lists the user's live sessions, each client seeing its own as current", async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox } = await signedInTwice(app);
    const before = Date.now();

    const fromChrome = await sessionsOf(chrome);
    expect(fromChrome).toHaveLength(2);
    for (const session of fromChrome) {
      expect(Object.keys(session).sort()).toEqual(
        ['createdAt', 'current', 'device', 'id', 'ip', 'lastSeenAt'].sort(),
      );
      expect(session.id).toMatch(UUID);
      expect(session.ip).toBe('127.0.0.1');
      for (const time of [session.createdAt, session.lastSeenAt]) {
        expect(new Date(time).toISOString()).toBe(time);
        expect(Math.abs(Date.parse(time) - before)).toBeLessThan(60_000);
      }
    }
    expect(fromChrome.filter((s) => s.current)).toHaveLength(1);
    const chromeCurrent = fromChrome.find((s) => s.current) as SessionView;
    const chromeOther = fromChrome.find((s) => !s.current) as SessionView;
    expect(chromeCurrent.device).toMatch(/Chrome/);
    expect(chromeCurrent.device).toMatch(/Windows/);
    expect(chromeOther.device).toMatch(/Firefox/);
    expect(chromeOther.device).toMatch(/Linux/);

    const fromFirefox = await sessionsOf(firefox);
    expect(fromFirefox.map((s) => s.id).sort()).toEqual(fromChrome.map((s) => s.id).sort());
    expect(fromFirefox.filter((s) => s.current)).toHaveLength(1);
    const firefoxCurrent = fromFirefox.find((s) => s.current) as SessionView;
    expect(firefoxCurrent.id).toBe(chromeOther.id);
    expect(firefoxCurrent.device).toMatch(/Firefox/);

    // The public id is neither the session id nor its database key.
    for (const client of [chrome, firefox]) {
      const cookie = cookieOf(client);
      for (const session of fromChrome) {
        expect(session.id).not.toBe(sessionIdOf(cookie));
        expect(session.id).not.toBe(idHashOf(cookie));
      }
    }
  });

  it("never lists another user's sessions, nor ended ones", async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox } = await signedInTwice(app);
    const bob = new Browser(app, FIREFOX_ON_LINUX);
    await bob.register(username('bob'), PASSWORD);
    const bobSession = await currentOf(bob);

    const aliceIds = (await sessionsOf(chrome)).map((s) => s.id);
    expect(aliceIds).toHaveLength(2);
    expect(aliceIds).not.toContain(bobSession.id);
    expect((await sessionsOf(bob)).map((s) => s.id)).toEqual([bobSession.id]);

    // Firefox signs out: gone from the list.
    const firefoxId = (await currentOf(firefox)).id;
    expect((await firefox.request({ method: 'POST', url: '/api/auth/logout' })).statusCode).toBe(204);
    expect((await sessionsOf(chrome)).map((s) => s.id)).toEqual([(await currentOf(chrome)).id]);
    expect((await sessionsOf(chrome)).map((s) => s.id)).not.toContain(firefoxId);
  });

  it('is 401 for an anonymous client', async () => {
    const { app } = await buildTestApp(db());
    expectError(
      await new TestClient(app).request({ method: 'GET', url: '/api/sessions' }),
      401,
      'UNAUTHENTICATED',
    );
  });
});

describe('DELETE /api/sessions/:id', () => {
  it('ends another session of the user at once', async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox } = await signedInTwice(app);
    const firefoxId = (await currentOf(firefox)).id;

    const response = await chrome.request({ method: 'DELETE', url: `/api/sessions/${firefoxId}` });
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');

    expectError(await firefox.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    expect(await meStatus(chrome)).toBe(200);
    expect((await sessionsOf(chrome)).map((s) => s.id)).not.toContain(firefoxId);
    // Ending it again: there is no such live session.
    expectError(
      await chrome.request({ method: 'DELETE', url: `/api/sessions/${firefoxId}` }),
      404,
      'NOT_FOUND',
    );
  });

  it('ends the current session too, when asked', async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox } = await signedInTwice(app);
    const own = await currentOf(chrome);
    expect((await chrome.request({ method: 'DELETE', url: `/api/sessions/${own.id}` })).statusCode).toBe(204);
    expect(await meStatus(chrome)).toBe(401);
    expect(await meStatus(firefox)).toBe(200);
  });

  it("answers 404 for an unknown id and for another user's session, which lives on", async () => {
    const { app } = await buildTestApp(db());
    const { chrome } = await signedInTwice(app);
    const bob = new TestClient(app);
    await bob.register(username('bob'), PASSWORD);
    const bobSession = await currentOf(bob);

    expectError(
      await chrome.request({ method: 'DELETE', url: `/api/sessions/${randomUUID()}` }),
      404,
      'NOT_FOUND',
    );
    expectError(
      await chrome.request({ method: 'DELETE', url: `/api/sessions/${bobSession.id}` }),
      404,
      'NOT_FOUND',
    );
    expect(await meStatus(bob)).toBe(200);
    expect((await sessionsOf(bob)).map((s) => s.id)).toEqual([bobSession.id]);
    expect((await sessionsOf(chrome)).length).toBe(2);
  });

  it.each(['not-a-uuid', '123', `${randomUUID()}x`, "x'%20OR%201=1"])(
    'answers a malformed id (%s) with 400',
    async (id) => {
      const { app } = await buildTestApp(db());
      const { chrome } = await signedInTwice(app);
      expectError(
        await chrome.request({ method: 'DELETE', url: `/api/sessions/${id}` }),
        400,
        'VALIDATION_FAILED',
      );
      expect((await sessionsOf(chrome)).length).toBe(2);
    },
  );

  it('is 401 for an anonymous client', async () => {
    const { app } = await buildTestApp(db());
    const { firefox } = await signedInTwice(app);
    const id = (await currentOf(firefox)).id;
    const anonymous = new TestClient(app);
    expectError(
      await anonymous.request({ method: 'DELETE', url: `/api/sessions/${id}` }),
      401,
      'UNAUTHENTICATED',
    );
    expectError(await anonymous.request({ method: 'DELETE', url: '/api/sessions' }), 401, 'UNAUTHENTICATED');
    expect(await meStatus(firefox)).toBe(200);
  });
});

describe('DELETE /api/sessions (sign out everywhere else)', () => {
  it('ends every other session of the user and keeps this one', async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox, user } = await signedInTwice(app);
    const third = new TestClient(app);
    expect((await login(third, user.username)).statusCode).toBe(200);
    const bob = new TestClient(app);
    await bob.register(username('bob'), PASSWORD);
    const cookie = cookieOf(chrome);

    const response = await chrome.request({ method: 'DELETE', url: '/api/sessions' });
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');

    expectError(await firefox.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    expectError(await third.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    expect(await meStatus(chrome)).toBe(200);
    // Same session, same cookie; another user's session is untouched.
    expect(cookieOf(chrome)).toBe(cookie);
    expect((await sessionsOf(chrome)).map((s) => s.current)).toEqual([true]);
    expect(await meStatus(bob)).toBe(200);
  });
});

describe('POST /api/auth/password', () => {
  it('ends a sign-in with the old password that raced the change, even one saved after it', async () => {
    const { app } = await buildTestApp(db());
    const owner = new TestClient(app);
    const user = await owner.register(username(), PASSWORD);
    const racer = new TestClient(app);
    await racer.csrfToken();

    // Hold the racer's session save (the last step of its sign-in, in onSend) until the password
    // change is over: the order in which the old code left the racer signed in.
    const sessions = app.repos.sessions;
    const upsert = sessions.upsert;
    let release = () => {};
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    let reached = () => {};
    const waiting = new Promise<void>((resolve) => {
      reached = resolve;
    });
    sessions.upsert = async (idHash, row) => {
      if (row.userId === user.id && sessions.upsert !== upsert) {
        sessions.upsert = upsert;
        reached();
        await held;
      }
      return upsert(idHash, row);
    };
    const signIn = login(racer, user.username);
    await waiting;
    const change = await owner.request({
      method: 'POST',
      url: '/api/auth/password',
      payload: { currentPassword: PASSWORD, newPassword: 'a brand new password' },
    });
    expect(change.statusCode).toBe(204);
    release();
    expect((await signIn).statusCode).toBe(200);

    // The racer's session was saved after the change ended the others: it must be dead anyway.
    expectError(await racer.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    expect((await owner.request({ method: 'GET', url: '/api/me' })).statusCode).toBe(200);
  });

  const NEW_PASSWORD = 'a brand new passphrase';

  it('changes the password, renews this session and ends all the others', async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox, user } = await signedInTwice(app);
    const bob = new TestClient(app);
    await bob.register(username('bob'), PASSWORD);
    const oldCookie = cookieOf(chrome);
    const oldToken = await chrome.csrfToken();

    const response = await chrome.request({
      method: 'POST',
      url: '/api/auth/password',
      payload: { currentPassword: PASSWORD, newPassword: NEW_PASSWORD },
      headers: { 'x-csrf-token': oldToken },
    });
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');

    // A new session id for this client; the old cookie value is dead.
    expect(setCookie(response, 'sid')).toBeDefined();
    const newCookie = cookieOf(chrome);
    expect(sessionIdOf(newCookie)).not.toBe(sessionIdOf(oldCookie));
    expectError(await me(app, oldCookie), 401, 'UNAUTHENTICATED');
    const who = await chrome.request({ method: 'GET', url: '/api/me' });
    expect(who.statusCode).toBe(200);
    expect(who.json().user.id).toBe(user.id);
    // Its CSRF token was renewed with it.
    expectError(
      await chrome.request({ method: 'DELETE', url: '/api/sessions', headers: { 'x-csrf-token': oldToken } }),
      403,
      'CSRF_INVALID',
    );
    expect(await chrome.csrfToken()).not.toBe(oldToken);

    // Every other session of the user ended; only the renewed one is listed.
    expectError(await firefox.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    const listed = await sessionsOf(chrome);
    expect(listed).toHaveLength(1);
    expect(listed[0]?.current).toBe(true);
    expect(listed[0]?.device).toMatch(/Chrome/);
    // Another user's session is not affected.
    expect(await meStatus(bob)).toBe(200);

    // The new password signs in, the old one does not.
    expect((await login(new TestClient(app), user.username, NEW_PASSWORD)).statusCode).toBe(200);
    expectError(await login(new TestClient(app), user.username, PASSWORD), 401, 'INVALID_CREDENTIALS');
  });

  it('refuses a wrong current password and changes nothing', async () => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox, user } = await signedInTwice(app);
    const cookie = cookieOf(chrome);
    const response = await chrome.request({
      method: 'POST',
      url: '/api/auth/password',
      payload: { currentPassword: `${PASSWORD}!`, newPassword: NEW_PASSWORD },
    });
    expectError(response, 401, 'INVALID_CREDENTIALS');
    expect(setCookies(response).filter((line) => line.startsWith('sid='))).toEqual([]);
    expect(cookieOf(chrome)).toBe(cookie);
    expect(await meStatus(chrome)).toBe(200);
    expect(await meStatus(firefox)).toBe(200);
    expect(await sessionsOf(chrome)).toHaveLength(2);
    expect((await login(new TestClient(app), user.username, PASSWORD)).statusCode).toBe(200);
    expectError(await login(new TestClient(app), user.username, NEW_PASSWORD), 401, 'INVALID_CREDENTIALS');
  });

  it.each([
    ['a new password of 7 characters', { currentPassword: PASSWORD, newPassword: 'x'.repeat(7) }],
    ['a new password of 1025 characters', { currentPassword: PASSWORD, newPassword: 'x'.repeat(1025) }],
    ['no current password', { newPassword: NEW_PASSWORD }],
  ])('refuses %s with 400 and changes nothing', async (_case, payload) => {
    const { app } = await buildTestApp(db());
    const { chrome, firefox, user } = await signedInTwice(app);
    const response = await chrome.request({ method: 'POST', url: '/api/auth/password', payload });
    expectError(response, 400, 'VALIDATION_FAILED');
    expect(await meStatus(firefox)).toBe(200);
    expect((await login(new TestClient(app), user.username, PASSWORD)).statusCode).toBe(200);
  });

  it('is 401 for an anonymous client', async () => {
    const { app } = await buildTestApp(db());
    const { user } = await signedInTwice(app);
    const response = await new TestClient(app).request({
      method: 'POST',
      url: '/api/auth/password',
      payload: { currentPassword: PASSWORD, newPassword: NEW_PASSWORD },
    });
    expectError(response, 401, 'UNAUTHENTICATED');
    expect((await login(new TestClient(app), user.username, PASSWORD)).statusCode).toBe(200);
  });
});

describe('timeouts', () => {
  it('ends a session unused for longer than SESSION_IDLE_TIMEOUT_SECONDS', async () => {
    const { app } = await buildTestApp(db(), { SESSION_IDLE_TIMEOUT_SECONDS: '60' });
    const { chrome, firefox } = await signedInTwice(app);
    const idHash = idHashOf(cookieOf(chrome));

    // Unused for 30 s: still alive.
    await app.db.query(
      `UPDATE sessions SET last_seen_at = now() - interval '30 seconds' WHERE id_hash = $1`,
      [idHash],
    );
    expect(await meStatus(chrome)).toBe(200);

    await app.db.query(`UPDATE sessions SET last_seen_at = now() - interval '2 minutes' WHERE id_hash = $1`, [
      idHash,
    ]);
    expectError(await chrome.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    // Not listed anywhere any more, and it stays over.
    expect((await sessionsOf(firefox)).map((s) => s.current)).toEqual([true]);
    expect(await meStatus(chrome)).toBe(401);
  });

  it('keeps a session that is used within the idle timeout alive for another full period', async () => {
    // The user makes a request every 40 s, well within the 60 s idle timeout: simulated by
    // moving the recorded last use back 40 s before each request.
    const { app } = await buildTestApp(db(), { SESSION_IDLE_TIMEOUT_SECONDS: '60' });
    const { chrome } = await signedInTwice(app);
    const idHash = idHashOf(cookieOf(chrome));
    for (let step = 1; step <= 3; step++) {
      await app.db.query(
        `UPDATE sessions SET last_seen_at = last_seen_at - interval '40 seconds' WHERE id_hash = $1`,
        [idHash],
      );
      expect(await meStatus(chrome), `request ${step}, 40 s after the previous one`).toBe(200);
    }
  });

  it('ends a session past its absolute timeout however active', async () => {
    const { app } = await buildTestApp(db(), { SESSION_ABSOLUTE_TIMEOUT_SECONDS: '3600' });
    const { chrome, firefox } = await signedInTwice(app);
    const idHash = idHashOf(cookieOf(chrome));
    const { rows } = await app.db.query<{ seconds: number }>(
      'SELECT extract(epoch FROM expires_at - created_at)::float AS seconds FROM sessions WHERE id_hash = $1',
      [idHash],
    );
    expect(rows[0]?.seconds).toBeGreaterThan(3600 - 60);
    expect(rows[0]?.seconds).toBeLessThan(3600 + 60);

    // Activity, including a write of the session, does not push the absolute timeout back.
    const expiresAt = async () =>
      (
        await app.db.query<{ expires_at: Date }>('SELECT expires_at FROM sessions WHERE id_hash = $1', [
          idHash,
        ])
      ).rows[0]?.expires_at.getTime();
    const before = await expiresAt();
    await new Promise((resolve) => setTimeout(resolve, 20));
    await chrome.csrfToken(); // stores the session's CSRF secret: a write
    expect(await meStatus(chrome)).toBe(200);
    expect(await expiresAt()).toBe(before);

    await app.db.query(`UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id_hash = $1`, [
      idHash,
    ]);
    expectError(await chrome.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    expect(await meStatus(firefox)).toBe(200);
    expect((await sessionsOf(firefox)).map((s) => s.current)).toEqual([true]);
  });

  it('records the last use at most once a minute', async () => {
    const { app } = await buildTestApp(db());
    const { chrome } = await signedInTwice(app);
    const idHash = idHashOf(cookieOf(chrome));
    const lastSeen = async () => {
      const { rows } = await app.db.query<{ last_seen_at: Date; age: number }>(
        'SELECT last_seen_at, extract(epoch FROM now() - last_seen_at)::float AS age FROM sessions WHERE id_hash = $1',
        [idHash],
      );
      return rows[0] as { last_seen_at: Date; age: number };
    };

    const first = await lastSeen();
    expect(await meStatus(chrome)).toBe(200);
    expect(await meStatus(chrome)).toBe(200);
    expect((await lastSeen()).last_seen_at.getTime()).toBe(first.last_seen_at.getTime());

    await app.db.query(`UPDATE sessions SET last_seen_at = now() - interval '2 minutes' WHERE id_hash = $1`, [
      idHash,
    ]);
    expect((await lastSeen()).age).toBeGreaterThan(110);
    expect(await meStatus(chrome)).toBe(200);
    const touched = await lastSeen();
    expect(touched.age).toBeGreaterThanOrEqual(0);
    expect(touched.age).toBeLessThan(10);
    // The list shows it.
    const current = await currentOf(chrome);
    expect(Math.abs(Date.parse(current.lastSeenAt) - touched.last_seen_at.getTime())).toBeLessThan(1000);
  });
});

describe('logout races', () => {
  it('a request in flight during logout cannot bring the session back (20 rounds)', async () => {
    const { app } = await buildTestApp(db());
    const user = await new TestClient(app).register(username(), PASSWORD);
    for (let round = 0; round < 20; round++) {
      const client = new TestClient(app);
      expect((await login(client, user.username)).statusCode).toBe(200);
      const token = await client.csrfToken();
      const cookie = `sid=${cookieOf(client)}`;
      const idHash = idHashOf(cookieOf(client));

      const [logout, csrf] = await Promise.all([
        app.inject({ method: 'POST', url: '/api/auth/logout', headers: { cookie, 'x-csrf-token': token } }),
        app.inject({ method: 'GET', url: '/api/csrf', headers: { cookie } }),
      ]);
      expect(logout.statusCode, `round ${round}`).toBe(204);
      expect(csrf.statusCode, `round ${round}`).toBe(200);

      expectError(
        await app.inject({ method: 'GET', url: '/api/me', headers: { cookie } }),
        401,
        'UNAUTHENTICATED',
      );
      // Whatever cookie the in-flight request answered with is no way back in either.
      const answered = csrf.cookies.find((c) => c.name === 'sid');
      if (answered?.value) {
        const who = await app.inject({
          method: 'GET',
          url: '/api/me',
          headers: { cookie: `sid=${answered.value}` },
        });
        expectError(who, 401, 'UNAUTHENTICATED');
      }
      const { rows } = await app.db.query<{ revoked: boolean }>(
        'SELECT revoked_at IS NOT NULL AS revoked FROM sessions WHERE id_hash = $1',
        [idHash],
      );
      expect(rows, `round ${round}`).toEqual([{ revoked: true }]);
    }
  });

  it('a write of the session that lands after the logout is dropped (deterministic)', async () => {
    // The in-flight request is one that really writes the session: a cookie signed with a
    // retired SESSION_SECRET is re-signed, which stores the session again. Its write is held
    // back until the logout has finished.
    const secretA = 'race-secret-A-0123456789abcdef0123456789';
    const secretB = 'race-secret-B-0123456789abcdef0123456789';
    const old = await buildTestApp(db(), { SESSION_SECRET: secretA });
    const client = new TestClient(old.app);
    await client.register(username(), PASSWORD);
    const token = await client.csrfToken();
    const cookie = `sid=${cookieOf(client)}`;
    const idHash = idHashOf(cookieOf(client));

    const { app } = await buildTestApp(db(), { SESSION_SECRET: `${secretB},${secretA}` });
    await app.ready();
    const sessions = app.repos.sessions;
    const upsert = sessions.upsert.bind(sessions);
    let releaseWrite = () => {};
    const writeHeld = new Promise<void>((resolve) => {
      releaseWrite = resolve;
    });
    let heldWrites = 0;
    sessions.upsert = async (hash, row) => {
      if (hash === idHash) {
        heldWrites++;
        await writeHeld;
      }
      return upsert(hash, row);
    };

    const inFlight = app.inject({ method: 'GET', url: '/api/me', headers: { cookie } });
    // Wait until the in-flight request has read the session and is about to write it.
    for (let i = 0; i < 200 && heldWrites === 0; i++) await new Promise((resolve) => setTimeout(resolve, 10));
    expect(heldWrites).toBe(1);

    const logout = await app.inject({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { cookie, 'x-csrf-token': token },
    });
    expect(logout.statusCode).toBe(204);
    releaseWrite();
    const late = await inFlight;
    expect(late.statusCode).toBe(200);

    const { rows } = await app.db.query<{ revoked: boolean; resigned: boolean }>(
      `SELECT revoked_at IS NOT NULL AS revoked, data ? 'resignedAt' AS resigned FROM sessions WHERE id_hash = $1`,
      [idHash],
    );
    // Still revoked, and the late write did not land at all.
    expect(rows).toEqual([{ revoked: true, resigned: false }]);
    expectError(
      await app.inject({ method: 'GET', url: '/api/me', headers: { cookie } }),
      401,
      'UNAUTHENTICATED',
    );
    const resigned = late.cookies.find((c) => c.name === 'sid')?.value;
    if (resigned) {
      const who = await app.inject({ method: 'GET', url: '/api/me', headers: { cookie: `sid=${resigned}` } });
      expectError(who, 401, 'UNAUTHENTICATED');
    }
  });

  it('the store refuses to write back a session ended by logout', async () => {
    const { app, config } = await buildTestApp(db());
    const client = new TestClient(app);
    const user = await client.register(username(), PASSWORD);
    const cookie = cookieOf(client);
    const sessionId = sessionIdOf(cookie);
    expect((await client.request({ method: 'POST', url: '/api/auth/logout' })).statusCode).toBe(204);

    const store = new PgSessionStore(app.repos.sessions, {
      idleSeconds: config.SESSION_IDLE_TIMEOUT_SECONDS,
      absoluteSeconds: config.SESSION_ABSOLUTE_TIMEOUT_SECONDS,
    });
    const session = {
      cookie: {
        expires: new Date(Date.now() + 3600_000),
        originalMaxAge: 3600_000,
        path: '/',
        httpOnly: true,
      },
      userId: user.id,
      _csrf: 'late',
    } as unknown as Session;
    await new Promise<void>((resolve, reject) =>
      store.set(sessionId, session, (error) => (error ? reject(error) : resolve())),
    );
    const got = await new Promise<Session | null | undefined>((resolve, reject) =>
      store.get(sessionId, (error, found) => (error ? reject(error) : resolve(found))),
    );
    expect(got).toBeNull();
    const { rows } = await app.db.query<{ revoked: boolean; csrf: string | null }>(
      `SELECT revoked_at IS NOT NULL AS revoked, data->>'_csrf' AS csrf FROM sessions WHERE id_hash = $1`,
      [hashSessionId(sessionId)],
    );
    expect(rows).toHaveLength(1);
    expect(rows[0]?.revoked).toBe(true);
    expect(rows[0]?.csrf).not.toBe('late');
    expectError(await me(app, cookie), 401, 'UNAUTHENTICATED');
  });
});

describe('SESSION_SECRET rotation', () => {
  const secretA = 'rotation-secret-A-0123456789abcdef012345';
  const secretB = 'rotation-secret-B-0123456789abcdef012345';

  it('re-signs a cookie signed with a retired secret, and the user stays signed in', async () => {
    const first = await buildTestApp(db(), { SESSION_SECRET: secretA });
    const client = new TestClient(first.app);
    const user = await client.register(username(), PASSWORD);
    const oldCookie = cookieOf(client);
    await first.app.close();

    const rotated = await buildTestApp(db(), { SESSION_SECRET: `${secretB},${secretA}` });
    const jar = new TestClient(rotated.app);
    jar.cookies.set('sid', oldCookie);
    const firstRequest = await jar.request({ method: 'GET', url: '/api/me' });
    expect(firstRequest.statusCode).toBe(200);
    expect(firstRequest.json().user.id).toBe(user.id);
    const line = setCookie(firstRequest, 'sid');
    expect(line).toBeDefined();
    const resigned = cookieOf(jar);
    expect(resigned).not.toBe(oldCookie);
    // Same session, new signature.
    expect(sessionIdOf(resigned)).toBe(sessionIdOf(oldCookie));

    for (let i = 0; i < 3; i++) {
      const again = await jar.request({ method: 'GET', url: '/api/me' });
      expect(again.statusCode).toBe(200);
      expect(again.json().user.id).toBe(user.id);
      // Re-signed once: no further Set-Cookie is needed.
      expect(setCookie(again, 'sid')).toBeUndefined();
    }
    expect(cookieOf(jar)).toBe(resigned);
    await rotated.app.close();

    // The re-signed cookie is signed with B: it outlives A's retirement, the old one does not.
    const retired = await buildTestApp(db(), { SESSION_SECRET: secretB });
    expect((await me(retired.app, resigned)).statusCode).toBe(200);
    const stale = await me(retired.app, oldCookie);
    expectError(stale, 401, 'UNAUTHENTICATED');
  });
});

describe('anonymous requests', () => {
  // About 13 s on PGlite alone and 4 s on Postgres; the margin is for a busy parallel run.
  it('store no session and set no cookie, 10,000 GETs of /api/me and /healthz', {
    timeout: 60_000,
  }, async () => {
    const { app } = await buildTestApp(db());
    await new TestClient(app).register(username(), PASSWORD);
    const rows = await count(app, 'sessions');

    const TOTAL = 10_000;
    const CONCURRENCY = 16;
    let next = 0;
    let cookies = 0;
    const statuses = new Map<number, number>();
    async function worker() {
      while (next < TOTAL) {
        const i = next++;
        const response = await app.inject({ method: 'GET', url: i % 2 === 0 ? '/api/me' : '/healthz' });
        statuses.set(response.statusCode, (statuses.get(response.statusCode) ?? 0) + 1);
        if (setCookies(response).length > 0) cookies++;
      }
    }
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));

    expect(Object.fromEntries(statuses)).toEqual({ 200: TOTAL / 2, 401: TOTAL / 2 });
    expect(cookies).toBe(0);
    expect(await count(app, 'sessions')).toBe(rows);
  });
});

describe('anonymous forms', () => {
  it('cost no session row; a message kept for the next page costs one of an hour at most', async () => {
    const { app } = await buildTestApp(db());
    const rows = await count(app, 'sessions');
    for (const url of ['/login', '/register', '/api/csrf']) {
      const response = await app.inject({ method: 'GET', url });
      expect(setCookie(response, 'sid'), url).toBeUndefined();
    }
    expect(await count(app, 'sessions')).toBe(rows);

    // A failed sign-in has something to keep: the message for the next page.
    const secondsLeft = async (idHash: string) => {
      const { rows } = await app.db.query<{ seconds: number }>(
        'SELECT extract(epoch FROM expires_at - now())::int AS seconds FROM sessions WHERE id_hash = $1',
        [idHash],
      );
      return rows[0]?.seconds;
    };
    const browser = new TestClient(app);
    const failed = await browser.request({
      method: 'POST',
      url: '/login',
      payload: `username=nobody&password=wrong+password&_csrf=${encodeURIComponent(await browser.csrfToken())}`,
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });
    expect(failed.statusCode).toBe(303);
    const cookie = setCookie(failed, 'sid') as string;
    expect(cookie).toBeDefined();
    const expires = Date.parse(/Expires=([^;]+)/i.exec(cookie)?.[1] ?? '');
    expect(expires - Date.now()).toBeLessThanOrEqual(3600_000);
    const left = await secondsLeft(
      hashSessionId(sessionIdOf(cookie.slice('sid='.length, cookie.indexOf(';')))),
    );
    expect(left).toBeGreaterThan(3500);
    expect(left).toBeLessThanOrEqual(3600);
    expect(await count(app, 'sessions')).toBe(rows + 1);

    // Signed in, a session lives for the absolute timeout (14 days by default).
    const client = new TestClient(app);
    await client.register(username(), PASSWORD);
    const id = sessionIdOf(client.cookies.get('sid') as string);
    expect(await secondsLeft(hashSessionId(id))).toBeGreaterThan(13 * 24 * 3600);
  });
});

describe('an ended session', () => {
  it('sends its browser to sign in, saying so in the URL: its cookie, replayed, writes no row', async () => {
    const { app } = await buildTestApp(db());
    const client = new TestClient(app);
    await client.register(username(), PASSWORD);
    expect(
      (await client.request({ method: 'DELETE', url: `/api/sessions/${(await currentOf(client)).id}` }))
        .statusCode,
    ).toBe(204);
    const rows = await count(app, 'sessions');
    for (let i = 0; i < 50; i++) {
      const page = await app.inject({
        method: 'GET',
        url: '/sessions',
        headers: { cookie: `sid=${client.cookies.get('sid')}`, accept: 'text/html' },
      });
      expect(page.statusCode).toBe(303);
      expect(page.headers.location).toBe('/login?next=%2Fsessions&ended=1');
      // No new session: at most the stale cookie is cleared.
      expect(setCookie(page, 'sid') ?? 'sid=;').toMatch(/^sid=;/);
    }
    expect(await count(app, 'sessions')).toBe(rows);
    const login = await app.inject({ method: 'GET', url: '/login?next=%2Fsessions&ended=1' });
    expect(login.body).toContain('Your session has ended');
    expect((await app.inject({ method: 'GET', url: '/login?next=%2Fsessions' })).body).not.toContain(
      'Your session has ended',
    );
  });
});

describe('TRUST_PROXY', () => {
  it('believes X-Forwarded-For only from the listed proxies: a client reaching A directly keeps its own IP', async () => {
    const { app } = await buildTestApp(db(), { TRUST_PROXY: '10.0.0.1' });
    const ipSeenFrom = async (remoteAddress: string) => {
      const client = new TestClient(app);
      const headers = { 'x-forwarded-for': '203.0.113.7' };
      const token = (await client.request({ method: 'GET', url: '/api/csrf', remoteAddress, headers })).json<{
        token: string;
      }>().token;
      await client.request({
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: username(), password: PASSWORD },
        remoteAddress,
        headers: { ...headers, 'x-csrf-token': token },
      });
      const list = await client.request({ method: 'GET', url: '/api/sessions', remoteAddress, headers });
      return list.json<{ sessions: SessionView[] }>().sessions[0]?.ip;
    };
    expect(await ipSeenFrom('10.0.0.1')).toBe('203.0.113.7');
    expect(await ipSeenFrom('198.51.100.9')).toBe('198.51.100.9');
  });
});
