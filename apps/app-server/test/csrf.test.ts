import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError, username } from './test-utils.ts';

const db = useTestDatabase();

const PASSWORD = 'correct horse battery';
/** APP_PUBLIC_URL in the test config (helpers.ts). */
const OWN_ORIGIN = 'http://a.test';

/** A signed-in client, with its CSRF token already fetched. */
async function signedIn(app: FastifyInstance) {
  const client = new TestClient(app);
  const user = await client.register(username(), PASSWORD);
  const token = await client.csrfToken();
  return { client, user, token };
}

async function expectSignedIn(client: TestClient, userId: string) {
  const who = await client.request({ method: 'GET', url: '/api/me' });
  expect(who.statusCode).toBe(200);
  expect(who.json().user.id).toBe(userId);
}

/** `a=1&b=2`, as a browser encodes an HTML form. */
const formBody = (fields: Record<string, string>) => new URLSearchParams(fields).toString();
const FORM = 'application/x-www-form-urlencoded';

describe('Origin check (second layer)', () => {
  it.each([
    ['another site', 'https://evil.example'],
    ['a look-alike host', 'http://a.test.evil.example'],
    ['the right host over another scheme', 'https://a.test'],
    ['the right host on another port', 'http://a.test:8080'],
    ['an opaque origin (sandboxed frame, data: URL)', 'null'],
  ])('refuses an unsafe request from %s even with a valid token', async (_case, origin) => {
    const { app } = await buildTestApp(db());
    const { client, user, token } = await signedIn(app);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { origin, 'x-csrf-token': token },
    });
    expectError(logout, 403, 'CSRF_INVALID');
    await expectSignedIn(client, user.id);

    // A fresh registration, where nothing else would stop it.
    const newName = username();
    const register = await client.request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username: newName, password: PASSWORD },
      headers: { origin, 'x-csrf-token': token },
    });
    expectError(register, 403, 'CSRF_INVALID');
    expect(await count(app, 'users WHERE username = $1', [newName])).toBe(0);
    await expectSignedIn(client, user.id);
  });

  it("allows A's own origin with a valid token", async () => {
    const { app } = await buildTestApp(db());
    const { client, token } = await signedIn(app);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { origin: OWN_ORIGIN, 'x-csrf-token': token },
    });
    expect(logout.statusCode).toBe(204);
    expectError(await client.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });

  it('allows its own origin when APP_PUBLIC_URL has a path prefix (browsers send no path)', async () => {
    const { app } = await buildTestApp(db(), { APP_PUBLIC_URL: `${OWN_ORIGIN}/files` });
    const { client, token } = await signedIn(app);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { origin: OWN_ORIGIN, 'x-csrf-token': token },
    });
    expect(logout.statusCode).toBe(204);
  });

  it("still needs the token from A's own origin", async () => {
    const { app } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { origin: OWN_ORIGIN },
      csrf: false,
    });
    expectError(logout, 403, 'CSRF_INVALID');
    await expectSignedIn(client, user.id);
  });

  it('refuses sec-fetch-site: cross-site even with a valid token and no Origin', async () => {
    const { app } = await buildTestApp(db());
    const { client, user, token } = await signedIn(app);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { 'sec-fetch-site': 'cross-site', 'x-csrf-token': token },
    });
    expectError(logout, 403, 'CSRF_INVALID');
    await expectSignedIn(client, user.id);

    // The browser's own-origin value passes.
    const sameOrigin = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { 'sec-fetch-site': 'same-origin', origin: OWN_ORIGIN, 'x-csrf-token': token },
    });
    expect(sameOrigin.statusCode).toBe(204);
  });

  it('allows a request without Origin (curl, scripts) that carries a valid token', async () => {
    const { app } = await buildTestApp(db());
    const { client, token } = await signedIn(app);
    const upload = await client.request({
      method: 'POST',
      url: '/api/files',
      headers: {
        'x-csrf-token': token,
        'content-type': 'multipart/form-data; boundary=x',
      },
      payload:
        '--x\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n',
    });
    expect(upload.statusCode).toBe(201);
    const logout = await client.request({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { 'x-csrf-token': token },
    });
    expect(logout.statusCode).toBe(204);
  });

  it('leaves safe methods alone (GET from another origin is not refused)', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const who = await client.request({
      method: 'GET',
      url: '/api/me',
      headers: { origin: 'https://evil.example', 'sec-fetch-site': 'cross-site' },
    });
    expect(who.statusCode).toBe(200);
  });
});

describe('HTML forms: the token as the hidden _csrf field', () => {
  async function setup() {
    const { app } = await buildTestApp(db());
    const registered = new TestClient(app);
    const user = await registered.register(username(), PASSWORD);
    // A browser that opened the sign-in page: an anonymous session with a token.
    const browser = new TestClient(app);
    const token = await browser.csrfToken();
    const post = (fields: Record<string, string>, headers: Record<string, string> = {}) =>
      browser.request({
        method: 'POST',
        url: '/api/auth/login',
        payload: formBody(fields),
        headers: { 'content-type': FORM, ...headers },
        csrf: false,
      });
    return { app, user, browser, token, post };
  }

  it('signs in with username, password and _csrf as form fields', async () => {
    const { user, browser, token, post } = await setup();
    const response = await post({ username: user.username, password: PASSWORD, _csrf: token });
    expect(response.statusCode).toBe(200);
    expect(response.json().user.id).toBe(user.id);
    await expectSignedIn(browser, user.id);
  });

  it('signs out with a form whose only field is _csrf', async () => {
    const { app, user } = await setup();
    const client = new TestClient(app);
    const login = await client.login(user.username, PASSWORD);
    expect(login.statusCode).toBe(200);
    const token = await client.csrfToken();
    const form = (fields: Record<string, string>) =>
      client.request({
        method: 'POST',
        url: '/api/auth/logout',
        payload: formBody(fields),
        headers: { 'content-type': FORM },
        csrf: false,
      });
    expectError(await form({}), 403, 'CSRF_INVALID');
    expectError(await form({ _csrf: 'garbage' }), 403, 'CSRF_INVALID');
    await expectSignedIn(client, user.id);
    expect((await form({ _csrf: token })).statusCode).toBe(204);
    expectError(await client.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });

  it('refuses the form without _csrf', async () => {
    const { browser, user, post } = await setup();
    expectError(await post({ username: user.username, password: PASSWORD }), 403, 'CSRF_INVALID');
    expectError(await browser.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });

  it('refuses the form with a wrong or foreign _csrf', async () => {
    const { app, browser, user, post } = await setup();
    const foreign = await new TestClient(app).csrfToken();
    for (const _csrf of ['garbage', foreign, '']) {
      expectError(await post({ username: user.username, password: PASSWORD, _csrf }), 403, 'CSRF_INVALID');
    }
    expectError(await browser.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });

  it('refuses the form from another origin even with a valid _csrf', async () => {
    const { browser, user, token, post } = await setup();
    const response = await post(
      { username: user.username, password: PASSWORD, _csrf: token },
      { origin: 'https://evil.example' },
    );
    expectError(response, 403, 'CSRF_INVALID');
    expectError(await browser.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });
});

describe('session control needs the token too', () => {
  it('refuses ending a session, signing out everywhere else and changing the password without it', async () => {
    const { app } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const other = new TestClient(app);
    const login = await other.login(user.username, PASSWORD);
    expect(login.statusCode).toBe(200);
    const list = await client.request({ method: 'GET', url: '/api/sessions' });
    expect(list.statusCode).toBe(200);
    const otherId = (list.json().sessions as { id: string; current: boolean }[]).find((s) => !s.current)?.id;
    expect(otherId).toBeDefined();

    const refused: LightMyRequestResponse[] = [
      await client.request({ method: 'DELETE', url: `/api/sessions/${otherId}`, csrf: false }),
      await client.request({ method: 'DELETE', url: '/api/sessions', csrf: false }),
      await client.request({
        method: 'POST',
        url: '/api/auth/password',
        payload: { currentPassword: PASSWORD, newPassword: 'another password 1' },
        csrf: false,
      }),
      // The other session's token is no good here either.
      await client.request({
        method: 'DELETE',
        url: '/api/sessions',
        headers: { 'x-csrf-token': await other.csrfToken() },
      }),
    ];
    for (const response of refused) expectError(response, 403, 'CSRF_INVALID');

    // Nothing changed: both sessions alive, the password unchanged.
    await expectSignedIn(client, user.id);
    await expectSignedIn(other, user.id);
    const again = await new TestClient(app).login(user.username, PASSWORD);
    expect(again.statusCode).toBe(200);
  });
});

describe('security headers (helmet)', () => {
  /** `directive -> sources` of a Content-Security-Policy header. */
  function csp(header: string | string[] | number | undefined): Map<string, string[]> {
    expect(typeof header).toBe('string');
    return new Map(
      String(header)
        .split(';')
        .map((directive) => directive.trim())
        .filter(Boolean)
        .map((directive) => {
          const [name = '', ...sources] = directive.split(/\s+/);
          return [name.toLowerCase(), sources];
        }),
    );
  }

  it.each([
    ['a JSON route', 'GET', '/api/me'],
    ['liveness', 'GET', '/healthz'],
    ['an unknown route', 'GET', '/no/such/page'],
  ])('are on %s', async (_case, method, url) => {
    const { app } = await buildTestApp(db());
    const response = await app.inject({ method: method as 'GET', url });
    const policy = csp(response.headers['content-security-policy']);
    expect(policy.get('default-src')).toEqual(["'self'"]);
    expect(policy.get('frame-ancestors')).toEqual(["'none'"]);
    expect(policy.get('object-src')).toEqual(["'none'"]);
    const scriptSrc = policy.get('script-src');
    expect(scriptSrc).toBeDefined();
    for (const source of scriptSrc ?? []) {
      expect(["'unsafe-inline'", "'unsafe-eval'", '*', 'data:', 'http:', 'https:']).not.toContain(source);
    }
    expect(policy.get('default-src')).not.toContain("'unsafe-inline'");
    expect(response.headers['x-content-type-options']).toBe('nosniff');
    expect(String(response.headers['x-frame-options']).toUpperCase()).toMatch(/^(DENY|SAMEORIGIN)$/);
    expect(response.headers['referrer-policy']).toEqual(expect.any(String));
    expect(String(response.headers['referrer-policy'])).not.toMatch(/unsafe-url|no-referrer-when-downgrade/);
  });

  it('are on refusals too (403 from the CSRF check)', async () => {
    const { app } = await buildTestApp(db());
    const response = await app.inject({
      method: 'POST',
      url: '/api/auth/logout',
      headers: { origin: 'https://evil.example' },
    });
    expectError(response, 403, 'CSRF_INVALID');
    expect(csp(response.headers['content-security-policy']).get('frame-ancestors')).toEqual(["'none'"]);
    expect(response.headers['x-content-type-options']).toBe('nosniff');
  });
});

describe('before sign-in: a signed double-submit token, and no session row', () => {
  const FORM_PAGES = ['/login', '/register', '/login?next=%2Ffiles', '/api/csrf'];

  it('a cookieless GET of the token or of a form page adds no session row (1,000 of each)', async () => {
    const { app } = await buildTestApp(db());
    await new TestClient(app).register(username(), PASSWORD);
    const rows = await count(app, 'sessions');
    for (const url of FORM_PAGES) {
      for (let i = 0; i < 1_000; i++) {
        const response = await app.inject({ method: 'GET', url });
        expect(response.statusCode).toBe(200);
        // The CSRF cookie and nothing else.
        expect(response.cookies.map((cookie) => cookie.name)).toEqual(['csrf']);
      }
    }
    expect(await count(app, 'sessions')).toBe(rows);
  }, 120_000);

  it('signs in and up with a token bound to the CSRF cookie, which then works for the session', async () => {
    const { app } = await buildTestApp(db());
    const client = new TestClient(app);
    const user = await client.register(username(), PASSWORD);
    expect(client.cookies.has('csrf')).toBe(true);
    await expectSignedIn(client, user.id);
    expect((await client.request({ method: 'POST', url: '/api/auth/logout' })).statusCode).toBe(204);
    expect((await client.login(user.username, PASSWORD)).statusCode).toBe(200);
    await expectSignedIn(client, user.id);
  });

  it.each([
    ['no token', () => undefined],
    ['a garbage token', () => 'garbage'],
    ['an empty token', () => ''],
    ['a token of another browser', (other: string) => other],
    ['a token with another MAC', (other: string) => `${other.split('.')[0]}.${'A'.repeat(43)}`],
  ])(
    'refuses an anonymous form post with %s (403 CSRF_INVALID, nobody signed in, no row)',
    async (_case, tokenOf) => {
      const { app } = await buildTestApp(db());
      const user = await new TestClient(app).register(username(), PASSWORD);
      const other = await new TestClient(app).csrfToken();
      const browser = new TestClient(app);
      await browser.csrfToken();
      const rows = await count(app, 'sessions');
      const token = tokenOf(other);
      for (const url of ['/api/auth/login', '/api/auth/register']) {
        const response = await browser.request({
          method: 'POST',
          url,
          payload: formBody({
            username: url.endsWith('login') ? user.username : username(),
            password: PASSWORD,
            ...(token !== undefined && { _csrf: token }),
          }),
          headers: { 'content-type': FORM },
          csrf: false,
        });
        expectError(response, 403, 'CSRF_INVALID');
      }
      // The HTML forms: a client that was never on A's pages gets the plain 403 too, and no
      // message (no row) is kept for it.
      const stranger = new TestClient(app);
      for (const url of ['/login', '/register', '/logout']) {
        const response = await stranger.request({
          method: 'POST',
          url,
          payload: formBody({
            username: user.username,
            password: PASSWORD,
            ...(token !== undefined && { _csrf: token }),
          }),
          headers: { 'content-type': FORM },
          csrf: false,
        });
        expectError(response, 403, 'CSRF_INVALID');
      }
      expect(await count(app, 'sessions')).toBe(rows);
      expectError(await browser.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
    },
  );

  it("refuses a token with the attacker's own CSRF cookie value but not the victim's cookie (login CSRF)", async () => {
    const { app } = await buildTestApp(db());
    const attacker = new TestClient(app);
    const attackerUser = await attacker.register(username(), PASSWORD);
    await attacker.request({ method: 'POST', url: '/api/auth/logout' });
    // The attacker holds a valid pair (their cookie, their token) and gets the victim's browser
    // to post their credentials with their token: the victim's browser sends its own cookie.
    const attackerToken = await attacker.csrfToken();
    const victim = new TestClient(app);
    await victim.csrfToken();
    const response = await victim.request({
      method: 'POST',
      url: '/api/auth/login',
      payload: formBody({ username: attackerUser.username, password: PASSWORD, _csrf: attackerToken }),
      headers: { 'content-type': FORM },
      csrf: false,
    });
    expectError(response, 403, 'CSRF_INVALID');
    expectError(await victim.request({ method: 'GET', url: '/api/me' }), 401, 'UNAUTHENTICATED');
  });

  it('keeps tokens valid across a SESSION_SECRET rotation, and not once the secret is dropped', async () => {
    const secretA = 'csrf-rotation-secret-A-0123456789abcdef01';
    const secretB = 'csrf-rotation-secret-B-0123456789abcdef01';
    const { app: first } = await buildTestApp(db(), { SESSION_SECRET: secretA });
    const user = await new TestClient(first).register(username(), PASSWORD);
    const browser = new TestClient(first);
    const token = await browser.csrfToken();
    const login = (app: FastifyInstance) => {
      const jar = new TestClient(app);
      jar.cookies = new Map(browser.cookies);
      return jar.request({
        method: 'POST',
        url: '/api/auth/login',
        payload: { username: user.username, password: PASSWORD },
        headers: { 'x-csrf-token': token },
      });
    };
    const { app: rotated } = await buildTestApp(db(), { SESSION_SECRET: `${secretB},${secretA}` });
    expect((await login(rotated)).statusCode).toBe(200);
    const { app: retired } = await buildTestApp(db(), { SESSION_SECRET: secretB });
    expectError(await login(retired), 403, 'CSRF_INVALID');
  });
});
