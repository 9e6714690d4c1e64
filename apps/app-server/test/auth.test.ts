import type { FastifyInstance, InjectOptions } from 'fastify';
import { describe, expect, it, onTestFinished } from 'vitest';
import { createTestDatabase } from '../../../test/support/database.ts';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import {
  cookieAttributes,
  count,
  expectError,
  HttpsProxiedClient,
  multipart,
  sessionIdOf,
  setCookie,
  setCookies,
  username,
} from './test-utils.ts';

const db = useTestDatabase();

const PASSWORD = 'correct horse battery';

const me = (app: FastifyInstance, cookie?: string) =>
  app.inject({ method: 'GET', url: '/api/me', headers: cookie ? { cookie } : {} });

/** A wrong password through the sign-in form: the browser gets an anonymous session (its message). */
async function failedFormSignIn(client: TestClient, name: string) {
  const token = await client.csrfToken();
  const response = await client.request({
    method: 'POST',
    url: '/login',
    payload: new URLSearchParams({ username: name, password: 'wrong password', _csrf: token }).toString(),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
  });
  expect(response.statusCode).toBe(303);
  return response;
}

async function registered(app: FastifyInstance, password = PASSWORD) {
  const client = new TestClient(app);
  const user = await client.register(username(), password);
  return { client, user, password };
}

describe('register', () => {
  it('creates the user and signs them in', async () => {
    const { app } = await buildTestApp(db());
    const client = new TestClient(app);
    const name = username('Reg.');
    const response = await client.request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: name, password: PASSWORD },
    });
    expect(response.statusCode).toBe(201);
    const { user } = response.json();
    expect(user).toEqual({ id: expect.any(String), username: name, createdAt: expect.any(String) });
    expect(new Date(user.createdAt).toISOString()).toBe(user.createdAt);
    expect(Math.abs(Date.parse(user.createdAt) - Date.now())).toBeLessThan(60_000);

    const who = await client.request({ method: 'GET', url: '/api/me' });
    expect(who.statusCode).toBe(200);
    expect(who.json()).toEqual({ user });
  });

  it('refuses a taken username, also in another case', async () => {
    const { app } = await buildTestApp(db());
    const name = username('alice');
    await new TestClient(app).register(name);
    for (const taken of [name, name.toUpperCase(), `A${name.slice(1)}`]) {
      const response = await new TestClient(app).request({
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: taken, password: PASSWORD },
      });
      expectError(response, 409, 'USERNAME_TAKEN');
    }
    expect(await count(app, 'users WHERE lower(username) = lower($1)', [name])).toBe(1);
  });

  it.each([
    ['too short', 'ab'],
    ['too long', 'a'.repeat(65)],
    ['with a space', 'a b'],
    ['non-ASCII', 'é'],
    ['non-ASCII, long enough', 'élodie'],
    ['empty', ''],
  ])('refuses a username %s', async (_case, name) => {
    const { app } = await buildTestApp(db());
    const response = await new TestClient(app).request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: name, password: PASSWORD },
    });
    expectError(response, 400, 'VALIDATION_FAILED');
  });

  it('accepts usernames of 3 and 64 characters of the allowed kinds', async () => {
    const { app } = await buildTestApp(db());
    const suffix = Math.random().toString(36).slice(2, 8);
    for (const name of [suffix.slice(0, 3), `a.b_c-D9${suffix}`.padEnd(64, 'x')]) {
      const client = new TestClient(app);
      const user = await client.register(name);
      expect(user.username).toBe(name);
    }
  });

  it.each([
    ['7 characters', 'x'.repeat(7)],
    ['1025 characters', 'x'.repeat(1025)],
  ])('refuses a password of %s', async (_case, password) => {
    const { app } = await buildTestApp(db());
    const response = await new TestClient(app).request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: username(), password },
    });
    expectError(response, 400, 'VALIDATION_FAILED');
  });

  it('refuses bodies that are not credentials', async () => {
    const { app } = await buildTestApp(db());
    for (const payload of [{ username: username() }, { password: PASSWORD }, { username: 1, password: 2 }]) {
      const response = await new TestClient(app).request({
        method: 'POST',
        url: '/api/auth/register',
        payload,
      });
      expectError(response, 400, 'VALIDATION_FAILED');
    }
  });

  it('takes a 1024-character password whole: one differing only in its last character fails', async () => {
    const { app } = await buildTestApp(db());
    const password = `${'p'.repeat(1023)}A`;
    const { user } = await registered(app, password);

    const right = await new TestClient(app).login(user.username, password);
    expect(right.statusCode).toBe(200);
    const wrong = await new TestClient(app).request({
      method: 'POST',
      url: '/api/auth/login',
      payload: { username: user.username, password: `${'p'.repeat(1023)}B` },
    });
    expectError(wrong, 401, 'INVALID_CREDENTIALS');
  });
});

describe('login', () => {
  it('signs in with a new session id; the pre-login session is dead', async () => {
    const { app } = await buildTestApp(db());
    const { user } = await registered(app);

    // A browser with an anonymous session (a failed sign-in left it a message).
    const client = new TestClient(app);
    const before = await failedFormSignIn(client, user.username);
    const oldCookie = client.cookies.get('sid');
    expect(oldCookie).toBeDefined();
    expect(setCookie(before, 'sid')).toBeDefined();
    const oldCsrf = await client.csrfToken();
    const rowsBefore = await count(app, 'sessions WHERE revoked_at IS NULL');

    const login = await client.login(user.username, PASSWORD);
    expect(login.statusCode).toBe(200);
    expect(login.json()).toEqual({ user });
    const newCookie = client.cookies.get('sid');
    expect(setCookie(login, 'sid')).toBeDefined();
    expect(newCookie).toBeDefined();
    expect(sessionIdOf(newCookie as string)).not.toBe(sessionIdOf(oldCookie as string));

    // The old session row was replaced, not kept next to the new one.
    expect(await count(app, 'sessions WHERE revoked_at IS NULL')).toBe(rowsBefore);
    // The new cookie is signed in, the old one is not, and the token from before is no good for
    // the signed-in session.
    expect((await me(app, `sid=${newCookie}`)).statusCode).toBe(200);
    expectError(await me(app, `sid=${oldCookie}`), 401, 'UNAUTHENTICATED');
    const withOld = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { 'x-csrf-token': oldCsrf },
    });
    expectError(withOld, 403, 'CSRF_INVALID');
    await expect(client.request({ method: 'GET', url: '/api/me' })).resolves.toMatchObject({
      statusCode: 200,
    });
  });

  it('accepts the username in another case', async () => {
    const { app } = await buildTestApp(db());
    const { user } = await registered(app);
    const response = await new TestClient(app).login(user.username.toUpperCase(), PASSWORD);
    expect(response.statusCode).toBe(200);
    expect(response.json().user.id).toBe(user.id);
  });

  it('refuses a wrong password and an unknown user alike', async () => {
    const { app } = await buildTestApp(db());
    const { user } = await registered(app);

    const client = new TestClient(app);
    const wrong = await client.request({
      method: 'POST',
      url: '/api/auth/login',
      payload: { username: user.username, password: `${PASSWORD}!` },
    });
    expectError(wrong, 401, 'INVALID_CREDENTIALS');
    const unknown = await client.login(username('nobody'), PASSWORD);
    expectError(unknown, 401, 'INVALID_CREDENTIALS');
    expect(unknown.json()).toEqual(wrong.json());
    expect(unknown.body).toBe(wrong.body);

    // Neither signed the client in.
    expectError(await client.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });
});

describe('logout', () => {
  it('ends the session server-side', async () => {
    const { app } = await buildTestApp(db());
    const { client, user } = await registered(app);
    // A second session of the same user survives the first one's logout.
    const other = new TestClient(app);
    const login = await other.login(user.username, PASSWORD);
    expect(login.statusCode).toBe(200);
    expect(await count(app, 'sessions WHERE revoked_at IS NULL AND user_id = $1', [user.id])).toBe(2);

    const cookie = `sid=${client.cookies.get('sid')}`;
    const csrf = await client.csrfToken();
    expect((await me(app, cookie)).statusCode).toBe(200);
    const rows = await count(app, 'sessions WHERE revoked_at IS NULL');
    const logout = await client.request({ method: 'POST', url: '/api/auth/logout' });
    expect(logout.statusCode).toBe(204);
    expect(logout.body).toBe('');

    expectError(await me(app, cookie), 401, 'UNAUTHENTICATED');
    expect(await count(app, 'sessions WHERE revoked_at IS NULL AND user_id = $1', [user.id])).toBe(1);
    // The row is gone, not merely signed out: the session's CSRF secret went with it.
    expect(await count(app, 'sessions WHERE revoked_at IS NULL')).toBe(rows - 1);
    const replay = await app.inject({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { cookie, 'x-csrf-token': csrf },
    });
    expectError(replay, 403, 'CSRF_INVALID');
    expect((await other.request({ method: 'GET', url: '/api/me' })).statusCode).toBe(200);
  });
});

describe('GET /api/me', () => {
  it('is 401 for an anonymous client', async () => {
    const { app } = await buildTestApp(db());
    expectError(await me(app), 401, 'UNAUTHENTICATED');
  });
});

describe('CSRF', () => {
  const ACTIONS = ['register', 'login', 'logout', 'upload', 'delete', 'mint'] as const;

  /** A signed-in client with one uploaded file, and the requests that need a CSRF token. */
  async function setup() {
    const { app } = await buildTestApp(db());
    const { client, user } = await registered(app);
    const upload = await client.upload('a.txt', 'hello', 'text/plain');
    expect(upload.statusCode).toBe(201);
    const fileId = upload.json().file.id as string;
    const newName = username();
    const requests: Record<(typeof ACTIONS)[number], InjectOptions & { headers: Record<string, string> }> = {
      register: {
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: newName, password: PASSWORD },
        headers: {},
      },
      login: {
        method: 'POST',
        url: '/api/auth/login',
        payload: { username: user.username, password: PASSWORD },
        headers: {},
      },
      logout: { method: 'POST', url: '/api/auth/logout', headers: {} },
      upload: {
        method: 'POST',
        url: '/api/files',
        ...multipart([{ name: 'file', filename: 'b.txt', contentType: 'text/plain', content: 'bye' }]),
      },
      delete: { method: 'DELETE', url: `/api/files/${fileId}`, headers: {} },
      mint: { method: 'POST', url: `/api/files/${fileId}/download-token`, headers: {} },
    };
    /** Nothing happened: still signed in as the same user, no new user, the file still there and alone. */
    async function expectNothingChanged() {
      const who = await client.request({ method: 'GET', url: '/api/me' });
      expect(who.statusCode).toBe(200);
      expect(who.json().user.id).toBe(user.id);
      expect(await count(app, 'users WHERE username = $1', [newName])).toBe(0);
      const list = await client.request({ method: 'GET', url: '/api/files' });
      expect(list.json().files.map((file: { id: string }) => file.id)).toEqual([fileId]);
    }
    return { app, client, requests, expectNothingChanged };
  }

  it.each(ACTIONS)('refuses %s without a token', async (action) => {
    const { client, requests, expectNothingChanged } = await setup();
    const response = await client.request({ ...requests[action], csrf: false });
    expectError(response, 403, 'CSRF_INVALID');
    await expectNothingChanged();
  });

  it('refuses register and login without a token from a client with no session at all', async () => {
    const { app } = await buildTestApp(db());
    const { user } = await registered(app);
    const fresh = new TestClient(app);
    const register = await fresh.request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: username(), password: PASSWORD },
      csrf: false,
    });
    expectError(register, 403, 'CSRF_INVALID');
    const login = await fresh.request({
      method: 'POST',
      url: '/api/auth/login',
      payload: { username: user.username, password: PASSWORD },
      csrf: false,
    });
    expectError(login, 403, 'CSRF_INVALID');
  });

  it.each(ACTIONS)("refuses %s with another session's token", async (action) => {
    const { app, client, requests, expectNothingChanged } = await setup();
    const foreign = await new TestClient(app).csrfToken();
    expect(foreign).not.toBe(await client.csrfToken());
    const request = requests[action];
    const response = await client.request({
      ...request,
      headers: { ...request.headers, 'x-csrf-token': foreign },
    });
    expectError(response, 403, 'CSRF_INVALID');
    await expectNothingChanged();
  });

  it('refuses a garbage token', async () => {
    const { client, requests, expectNothingChanged } = await setup();
    const response = await client.request({
      ...requests.logout,
      headers: { 'x-csrf-token': 'garbage' },
    });
    expectError(response, 403, 'CSRF_INVALID');
    await expectNothingChanged();
  });

  it('renews the token with the session at login', async () => {
    const { app } = await buildTestApp(db());
    const { user } = await registered(app);
    const client = new TestClient(app);
    const before = await client.csrfToken();
    const login = await client.request({
      method: 'POST',
      url: '/api/auth/login',
      payload: { username: user.username, password: PASSWORD },
      headers: { 'x-csrf-token': before },
    });
    expect(login.statusCode).toBe(200);

    const stale = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { 'x-csrf-token': before },
    });
    expectError(stale, 403, 'CSRF_INVALID');
    const after = await client.csrfToken();
    expect(after).not.toBe(before);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { 'x-csrf-token': after },
    });
    expect(logout.statusCode).toBe(204);
  });
});

describe('session cookie', () => {
  it('is neither stored nor sent for anonymous GETs', async () => {
    const { app } = await buildTestApp(db());
    const rows = await count(app, 'sessions WHERE revoked_at IS NULL');
    for (let i = 0; i < 50; i++) {
      const health = await app.inject({ method: 'GET', url: '/healthz' });
      expect(health.statusCode).toBe(200);
      expect(setCookies(health)).toEqual([]);
      const who = await me(app);
      expectError(who, 401, 'UNAUTHENTICATED');
      expect(setCookies(who)).toEqual([]);
    }
    expect(await count(app, 'sessions WHERE revoked_at IS NULL')).toBe(rows);
  });

  it('treats a tampered cookie as anonymous', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await registered(app);
    const real = client.cookies.get('sid') as string;
    const decoded = decodeURIComponent(real);
    const flipped = `${decoded.slice(0, -1)}${decoded.endsWith('A') ? 'B' : 'A'}`;
    const otherId = `${'A'.repeat(32)}${decoded.slice(decoded.lastIndexOf('.'))}`;
    for (const value of ['garbage.sig', 'garbage', '.', '', '%', encodeURIComponent(flipped), otherId]) {
      const response = await me(app, `sid=${value}`);
      expectError(response, 401, 'UNAUTHENTICATED');
      const post = await app.inject({
        method: 'POST',
        url: '/api/auth/logout',
        headers: { cookie: `sid=${value}`, 'x-csrf-token': 'x' },
      });
      expectError(post, 403, 'CSRF_INVALID');
    }
    // The real cookie still works.
    expect((await me(app, `sid=${real}`)).statusCode).toBe(200);
  });

  it('is never stored as the raw session id', async () => {
    const { app } = await buildTestApp(db());
    const { client, user } = await registered(app);
    const anonymous = new TestClient(app);
    await failedFormSignIn(anonymous, user.username);
    for (const cookie of [client.cookies.get('sid'), anonymous.cookies.get('sid')]) {
      expect(cookie).toBeDefined();
      const id = sessionIdOf(cookie as string);
      expect(id.length).toBeGreaterThanOrEqual(20);
      const { rows } = await app.db.query<{ id_hash: string; data: string }>(
        'SELECT id_hash, data::text AS data FROM sessions',
      );
      expect(rows.length).toBeGreaterThan(0);
      for (const row of rows) {
        expect(row.id_hash).not.toBe(id);
        expect(row.id_hash).not.toContain(id);
        expect(row.data).not.toContain(id);
      }
    }
  });

  it('is HttpOnly, SameSite=Lax and Path=/, as is the CSRF cookie of a browser not signed in', async () => {
    const { app } = await buildTestApp(db());
    const csrf = await app.inject({ method: 'GET', url: '/api/csrf' });
    const register = await app.inject({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: username(), password: PASSWORD },
      headers: {
        cookie: `csrf=${csrf.cookies.find((cookie) => cookie.name === 'csrf')?.value}`,
        'x-csrf-token': csrf.json().token,
      },
    });
    expect(register.statusCode).toBe(201);
    for (const line of [setCookie(register, 'sid'), setCookie(csrf, 'csrf')]) {
      expect(line).toBeDefined();
      const attributes = cookieAttributes(line as string);
      expect(attributes.has('httponly')).toBe(true);
      expect(attributes.get('samesite')?.toLowerCase()).toBe('lax');
      expect(attributes.get('path')).toBe('/');
      expect(attributes.has('domain')).toBe(false);
    }
  });

  it('is __Host-sid and Secure in production', async () => {
    // A database of its own: with a KEK, A refuses the plain signing keys other tests left.
    const own = await createTestDatabase();
    onTestFinished(() => own.close());
    const { app } = await buildTestApp(own, {
      NODE_ENV: 'production',
      SESSION_SECRET: 'production-session-secret-0123456789abcdef',
      KEY_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64url'),
      TRUST_PROXY: 'loopback',
    });
    const client = new HttpsProxiedClient(app);
    // Before sign-in: the CSRF cookie, and no session.
    const csrf = await client.request({ method: 'GET', url: '/api/csrf' });
    expect(setCookies(csrf).map((line) => line.slice(0, line.indexOf('=')))).toEqual(['__Host-csrf']);
    const register = await client.request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: username(), password: PASSWORD },
    });
    expect(register.statusCode).toBe(201);
    for (const line of [setCookie(csrf, '__Host-csrf'), setCookie(register, '__Host-sid')]) {
      expect(line).toBeDefined();
      const attributes = cookieAttributes(line as string);
      expect(attributes.has('secure')).toBe(true);
      expect(attributes.has('httponly')).toBe(true);
      expect(attributes.get('samesite')?.toLowerCase()).toBe('lax');
      expect(attributes.get('path')).toBe('/');
      expect(attributes.has('domain')).toBe(false);
    }

    // And the session works end to end under that name.
    const who = await client.request({ method: 'GET', url: '/api/me' });
    expect(who.statusCode).toBe(200);
    expect(who.json().user.id).toBe(register.json().user.id);
    // The device cookie (sign-in throttling) is __Host- prefixed and Secure too.
    expect([...client.cookies.keys()].sort()).toEqual(['__Host-csrf', '__Host-device', '__Host-sid']);
  });

  it('keeps working across a SESSION_SECRET rotation', async () => {
    const secretA = 'secret-A-0123456789abcdef0123456789abcdef';
    const secretB = 'secret-B-0123456789abcdef0123456789abcdef';
    const first = await buildTestApp(db(), { SESSION_SECRET: secretA });
    const { client, user } = await registered(first.app);
    const cookie = client.cookies.get('sid') as string;
    await first.app.close();

    const rotated = await buildTestApp(db(), { SESSION_SECRET: `${secretB},${secretA}` });
    const who = await me(rotated.app, `sid=${cookie}`);
    expect(who.statusCode).toBe(200);
    expect(who.json().user.id).toBe(user.id);
    // New sessions are signed with the first secret and work as well.
    const { client: newClient } = await registered(rotated.app);
    expect((await newClient.request({ method: 'GET', url: '/api/me' })).statusCode).toBe(200);
    await rotated.app.close();

    // Once A is dropped, its cookies are worthless; B's keep working.
    const retired = await buildTestApp(db(), { SESSION_SECRET: secretB });
    expectError(await me(retired.app, `sid=${cookie}`), 401, 'UNAUTHENTICATED');
    expect((await me(retired.app, `sid=${newClient.cookies.get('sid')}`)).statusCode).toBe(200);
  });
});
