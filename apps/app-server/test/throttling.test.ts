import { performance } from 'node:perf_hooks';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError, username } from './test-utils.ts';

const db = useTestDatabase();

const PASSWORD = 'correct horse battery';
const WRONG = 'not the password at all';

/** A on the test database, with no failed sign-ins left over from other tests of this file. */
async function freshApp(env: Record<string, string> = {}) {
  const built = await buildTestApp(db(), env);
  await built.app.db.query('DELETE FROM login_failures');
  return built;
}

async function registered(app: FastifyInstance) {
  return new TestClient(app).register(username(), PASSWORD);
}

/** A sign-in attempt from a fresh client (its own session and CSRF token), from `ip`. */
function attempt(app: FastifyInstance, name: string, password: string, ip = '127.0.0.1') {
  return new TestClient(app).request({
    method: 'POST',
    url: '/api/auth/login',
    payload: { username: name, password },
    remoteAddress: ip,
  });
}

/** 429 RATE_LIMITED with a whole number of seconds in Retry-After, within the window. */
function expectThrottled(response: LightMyRequestResponse, maxSeconds = 900): number {
  expectError(response, 429, 'RATE_LIMITED');
  const header = String(response.headers['retry-after']);
  expect(header).toMatch(/^\d+$/);
  const seconds = Number(header);
  expect(seconds).toBeGreaterThanOrEqual(1);
  expect(seconds).toBeLessThanOrEqual(maxSeconds);
  return seconds;
}

describe('per account (defaults: 5 failures in 15 minutes)', () => {
  it('refuses the 6th attempt, even with the right password, until the window has passed', async () => {
    const { app } = await freshApp();
    const user = await registered(app);

    for (let i = 0; i < 5; i++) {
      expectError(await attempt(app, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    const throttled = await attempt(app, user.username, PASSWORD);
    const seconds = expectThrottled(throttled);
    // The failures just happened: the account is free again in about the whole window.
    expect(seconds).toBeGreaterThan(800);
    // Not signed in by the refused attempt, and further attempts do not extend the lockout.
    expect(throttled.cookies.some((c) => c.name === 'sid' && c.value !== '')).toBe(false);
    for (let i = 0; i < 3; i++) expectThrottled(await attempt(app, user.username, WRONG));
    expect(await count(app, 'login_failures WHERE username = $1', [user.username.toLowerCase()])).toBe(5);

    // Still inside the window (14 minutes later): still throttled.
    await app.db.query(`UPDATE login_failures SET at = at - interval '14 minutes'`);
    const later = expectThrottled(await attempt(app, user.username, PASSWORD));
    expect(later).toBeLessThanOrEqual(61);

    // Out of the window: the right password works again. Never a permanent lockout.
    await app.db.query(`UPDATE login_failures SET at = at - interval '2 minutes'`);
    const client = new TestClient(app);
    const login = await client.login(user.username, PASSWORD);
    expect(login.statusCode).toBe(200);
    expect((await client.request({ method: 'GET', url: '/api/me' })).statusCode).toBe(200);
  });

  it('counts the account whatever the letter case of the username', async () => {
    const { app } = await freshApp();
    const user = await registered(app);
    const variants = [user.username.toUpperCase(), user.username, user.username.toLowerCase()];
    for (let i = 0; i < 5; i++) {
      expectError(await attempt(app, variants[i % 3] as string, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    expectThrottled(await attempt(app, user.username.toLowerCase(), PASSWORD));
    expectThrottled(await attempt(app, user.username.toUpperCase(), PASSWORD));
  });

  it('does not throttle other accounts', async () => {
    const { app } = await freshApp();
    const victim = await registered(app);
    const bystander = await registered(app);
    for (let i = 0; i < 5; i++) await attempt(app, victim.username, WRONG);
    expectThrottled(await attempt(app, victim.username, PASSWORD));
    expect((await attempt(app, bystander.username, PASSWORD)).statusCode).toBe(200);
  });

  it('lets no more than 5 guesses through when they arrive all at once', async () => {
    const { app } = await freshApp();
    const user = await registered(app);
    // Clients with their sessions and tokens ready, so the sign-ins themselves run concurrently.
    const clients = await Promise.all(
      Array.from({ length: 20 }, async () => {
        const client = new TestClient(app);
        await client.csrfToken();
        return client;
      }),
    );
    const responses = await Promise.all(clients.map((client) => client.login(user.username, WRONG)));
    const statuses = responses.map((response) => response.statusCode);
    expect(statuses.filter((status) => status !== 401 && status !== 429)).toEqual([]);
    // Every guess that was checked against the password counts; at most the allowance.
    expect(statuses.filter((status) => status === 401).length).toBeLessThanOrEqual(5);
    for (const response of responses.filter((r) => r.statusCode === 429)) expectThrottled(response);
  });

  it("clears the account's failures on a successful sign-in", async () => {
    const { app } = await freshApp();
    const user = await registered(app);
    for (let i = 0; i < 4; i++) {
      expectError(await attempt(app, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    expect((await attempt(app, user.username, PASSWORD)).statusCode).toBe(200);
    expect(
      await count(app, 'login_failures WHERE username = $1 AND NOT cleared', [user.username.toLowerCase()]),
    ).toBe(0);

    // A full allowance again: 5 more failures before the next is refused.
    for (let i = 0; i < 5; i++) {
      expectError(await attempt(app, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    expectThrottled(await attempt(app, user.username, PASSWORD));
  });
});

describe('per client IP', () => {
  it('refuses a 6th username from an IP with 5 failures, but not another IP', async () => {
    const { app } = await freshApp({
      LOGIN_MAX_FAILURES_PER_IP: '5',
      LOGIN_MAX_FAILURES_PER_ACCOUNT: '100',
    });
    const attacker = '10.1.2.3';
    const targets = await Promise.all(Array.from({ length: 5 }, () => registered(app)));
    for (const target of targets) {
      expectError(await attempt(app, target.username, WRONG, attacker), 401, 'INVALID_CREDENTIALS');
    }
    const sixth = await registered(app);
    expectThrottled(await attempt(app, sixth.username, PASSWORD, attacker));
    // Unknown usernames are throttled the same way (nothing to learn from the difference).
    expectThrottled(await attempt(app, username('nobody'), WRONG, attacker));

    // Another client IP is not affected.
    expect((await attempt(app, sixth.username, PASSWORD, '10.9.8.7')).statusCode).toBe(200);
    expectThrottled(await attempt(app, sixth.username, PASSWORD, attacker));

    // After the window the attacker's IP may try again.
    await app.db.query(`UPDATE login_failures SET at = at - interval '16 minutes'`);
    expect((await attempt(app, sixth.username, PASSWORD, attacker)).statusCode).toBe(200);
  });

  it("keeps counting an IP's failures when a targeted user signs in elsewhere", async () => {
    // A success clears the account's failures, not the IP's (repositories/login-failures.ts):
    // the victims signing in as usual must not hand the attacker's IP fresh attempts.
    const { app } = await freshApp({
      LOGIN_MAX_FAILURES_PER_IP: '5',
      LOGIN_MAX_FAILURES_PER_ACCOUNT: '100',
    });
    const attacker = '10.1.2.4';
    const targets = await Promise.all(Array.from({ length: 5 }, () => registered(app)));
    for (const target of targets) {
      expectError(await attempt(app, target.username, WRONG, attacker), 401, 'INVALID_CREDENTIALS');
    }
    const next = await registered(app);
    expectThrottled(await attempt(app, next.username, WRONG, attacker));

    // Two of the targeted users sign in from their own IPs.
    expect((await attempt(app, targets[0]?.username as string, PASSWORD, '10.9.8.7')).statusCode).toBe(200);
    expect((await attempt(app, targets[1]?.username as string, PASSWORD, '10.9.8.6')).statusCode).toBe(200);

    // The attacker's IP is still over its limit.
    expectThrottled(await attempt(app, next.username, WRONG, attacker));
  });
});

describe('shared by replicas', () => {
  it('counts failures on one replica on every other', async () => {
    const { app: one } = await freshApp();
    const { app: two } = await buildTestApp(db());
    const user = await registered(one);

    for (let i = 0; i < 3; i++) {
      expectError(await attempt(one, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    for (let i = 0; i < 2; i++) {
      expectError(await attempt(two, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    expectThrottled(await attempt(two, user.username, PASSWORD));
    expectThrottled(await attempt(one, user.username, PASSWORD));
  });

  it('throttles on replica 2 after 5 failures on replica 1', async () => {
    const { app: one } = await freshApp();
    const { app: two } = await buildTestApp(db());
    const user = await registered(one);
    for (let i = 0; i < 5; i++) {
      expectError(await attempt(one, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    }
    expectThrottled(await attempt(two, user.username, PASSWORD));
  });
});

describe('unknown user and wrong password', () => {
  const median = (values: number[]) => {
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)] as number;
  };

  it('get the same status and body, in about the same time', async () => {
    // The production cost (argon2id, m=19 MiB, t=2), set through config as a deployment would:
    // with the cheap test cost the hash is too fast for a missing dummy hash to show in timings.
    const { app } = await freshApp({
      ARGON2_MEMORY_KIB: '19456',
      ARGON2_TIME_COST: '2',
      LOGIN_MAX_FAILURES_PER_ACCOUNT: '1000',
      LOGIN_MAX_FAILURES_PER_IP: '1000',
    });
    const user = await registered(app);
    const client = new TestClient(app);
    const token = await client.csrfToken();
    const timed = async (name: string) => {
      const start = performance.now();
      const response = await client.request({
        method: 'POST',
        url: '/api/auth/login',
        payload: { username: name, password: WRONG },
        headers: { 'x-csrf-token': token },
      });
      return { response, ms: performance.now() - start };
    };

    // Warm up both paths (the dummy hash is computed once, lazily or at start).
    await timed(username('nobody'));
    await timed(user.username);

    const unknown: number[] = [];
    const wrong: number[] = [];
    for (let i = 0; i < 5; i++) {
      const a = await timed(username('nobody'));
      const b = await timed(user.username);
      expectError(a.response, 401, 'INVALID_CREDENTIALS');
      expectError(b.response, 401, 'INVALID_CREDENTIALS');
      expect(a.response.body).toBe(b.response.body);
      expect(a.response.headers['content-type']).toBe(b.response.headers['content-type']);
      unknown.push(a.ms);
      wrong.push(b.ms);
    }
    const ratio = median(unknown) / median(wrong);
    expect(ratio, `unknown user ${median(unknown)} ms, wrong password ${median(wrong)} ms`).toBeGreaterThan(
      0.5,
    );
    expect(ratio, `unknown user ${median(unknown)} ms, wrong password ${median(wrong)} ms`).toBeLessThan(2);
  });
});

describe('minting download tokens (MINT_RATE_PER_MINUTE, counted across replicas)', () => {
  /** A signed-in user with one uploaded file, on `app`. */
  async function owner(app: FastifyInstance) {
    const client = new TestClient(app);
    const user = await client.register(username(), PASSWORD);
    const upload = await client.upload('a.txt', 'hello');
    return { client, user, fileId: upload.json<{ file: { id: string } }>().file.id };
  }
  const mint = (client: TestClient, fileId: string) =>
    client.request({ method: 'POST', url: `/api/files/${fileId}/download-token` });

  it('refuses mints over the limit with 429 and Retry-After up to the next minute, on every replica, for that user only', async () => {
    const env = { MINT_RATE_PER_MINUTE: '3' };
    const { app } = await freshApp(env);
    // A second replica on the same database.
    const { app: replica } = await buildTestApp(db(), env);
    const alice = await owner(app);
    const bob = await owner(app);
    // Not in the last second of a minute, so that all of this happens within one window.
    const msIntoMinute = Date.now() % 60_000;
    if (msIntoMinute > 55_000) await new Promise((resolve) => setTimeout(resolve, 60_500 - msIntoMinute));

    for (let i = 0; i < 3; i++) expect((await mint(alice.client, alice.fileId)).statusCode).toBe(201);
    const refused = await mint(alice.client, alice.fileId);
    expect(expectThrottled(refused, 60)).toBeLessThanOrEqual(60);
    // The same session through another replica: the count is shared.
    const elsewhere = new TestClient(replica);
    elsewhere.cookies = alice.client.cookies;
    elsewhere.csrf = alice.client.csrf;
    expectThrottled(await mint(elsewhere, alice.fileId), 60);
    // The page link counts too.
    expectThrottled(
      await alice.client.request({ method: 'GET', url: `/files/${alice.fileId}/download` }),
      60,
    );
    // Someone else is not affected.
    expect((await mint(bob.client, bob.fileId)).statusCode).toBe(201);

    // Next minute (the window moved back by hand rather than waiting): allowed again.
    await app.db.query("UPDATE mint_counts SET window_start = window_start - interval '1 minute'");
    expect((await mint(alice.client, alice.fileId)).statusCode).toBe(201);
  });

  it("a browser's Download link, refused, goes back to the file list, which says why", async () => {
    const { app } = await freshApp({ MINT_RATE_PER_MINUTE: '1' });
    const alice = await owner(app);
    const bob = await owner(app);
    const navigate = (client: TestClient, url: string) =>
      client.request({
        method: 'GET',
        url,
        headers: { accept: 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8' },
      });
    const msIntoMinute = Date.now() % 60_000;
    if (msIntoMinute > 55_000) await new Promise((resolve) => setTimeout(resolve, 60_500 - msIntoMinute));

    const first = await navigate(alice.client, `/files/${alice.fileId}/download`);
    expect(first.statusCode).toBe(303);
    expect(first.headers.location).toMatch(/^http:\/\/b\.test\/d\//);
    const refused = await navigate(alice.client, `/files/${alice.fileId}/download`);
    expect(refused.statusCode).toBe(303);
    expect(refused.headers.location).toBe('/');
    expect((await navigate(alice.client, '/')).body).toMatch(
      /You started too many downloads in the last minute\. Try again in \d+ seconds?\./,
    );

    const notYours = await navigate(bob.client, `/files/${alice.fileId}/download`);
    expect(notYours.statusCode).toBe(303);
    expect(notYours.headers.location).toBe('/');
    expect((await navigate(bob.client, '/')).body).toContain('That file does not exist (any more).');
  });

  it('a file that is not yours (404) is not counted', async () => {
    const { app } = await freshApp({ MINT_RATE_PER_MINUTE: '1' });
    const alice = await owner(app);
    const bob = await owner(app);
    for (let i = 0; i < 5; i++) expectError(await mint(bob.client, alice.fileId), 404, 'NOT_FOUND');
    expect((await mint(bob.client, bob.fileId)).statusCode).toBe(201);
  });

  it('0 turns the limit off: nothing is counted', async () => {
    const { app } = await freshApp({ MINT_RATE_PER_MINUTE: '0' });
    const alice = await owner(app);
    for (let i = 0; i < 20; i++) expect((await mint(alice.client, alice.fileId)).statusCode).toBe(201);
    expect(await count(app, 'mint_counts WHERE user_id = $1', [alice.user.id])).toBe(0);
  });

  it('the default is 600 a minute', async () => {
    const { config } = await freshApp();
    expect(config.MINT_RATE_PER_MINUTE).toBe(600);
  });
});

/** A form post of a browser that loaded the form first (its session's CSRF token in `_csrf`). */
async function formPost(client: TestClient, url: string, fields: Record<string, string>) {
  const token = await client.csrfToken();
  return client.request({
    method: 'POST',
    url,
    payload: new URLSearchParams({ ...fields, _csrf: token }).toString(),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
  });
}

describe('one account, one throttle bucket', () => {
  it('the sign-in form refuses a username the API refuses, before it is counted or looked up', async () => {
    const { app } = await freshApp();
    const user = await registered(app);
    // Letters that case-fold differently in JavaScript and in Postgres ("İ", the Kelvin sign):
    // each spelling used to be a bucket of its own, so an account had several allowances.
    for (const spelling of [`${user.username}İ`, `${user.username.slice(0, -1)}\u212a`, 'İstanbul']) {
      const response = await formPost(new TestClient(app), '/login', { username: spelling, password: WRONG });
      expect(response.statusCode).toBe(303);
      expect(response.headers.location).toBe('/login');
    }
    expect(await count(app, 'login_failures')).toBe(0);
  });

  it('counts the account under the name Postgres folds it to', async () => {
    const { app } = await freshApp();
    const user = await registered(app);
    await attempt(app, user.username.toUpperCase(), WRONG);
    const { rows } = await app.db.query<{ username: string }>('SELECT username FROM login_failures');
    const folded = await app.db.query<{ name: string }>('SELECT lower($1) AS name', [user.username]);
    expect(rows.map((row) => row.username)).toEqual([folded.rows[0]?.name]);
  });
});

describe('password change', () => {
  it('counts wrong current passwords like failed sign-ins: the 6th attempt is 429', async () => {
    const { app } = await freshApp();
    const client = new TestClient(app);
    await client.register(username(), PASSWORD);
    const change = (currentPassword: string) =>
      client.request({
        method: 'POST',
        url: '/api/auth/password',
        payload: { currentPassword, newPassword: 'a brand new password' },
      });
    for (let i = 0; i < 5; i++) expectError(await change(WRONG), 401, 'INVALID_CREDENTIALS');
    // A stolen session cannot go on guessing: refused even with the right password now.
    expectThrottled(await change(PASSWORD));
    await app.db.query(`UPDATE login_failures SET at = at - interval '16 minutes'`);
    expect((await change(PASSWORD)).statusCode).toBe(204);
  });
});

describe('registration', () => {
  it('is limited per client IP (REGISTRATIONS_PER_IP_PER_HOUR), across replicas', async () => {
    const { app: one } = await freshApp({ REGISTRATIONS_PER_IP_PER_HOUR: '3' });
    const { app: two } = await buildTestApp(db(), { REGISTRATIONS_PER_IP_PER_HOUR: '3' });
    await one.db.query('DELETE FROM registrations');
    const register = (app: FastifyInstance, ip: string) =>
      new TestClient(app).request({
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: username(), password: PASSWORD },
        remoteAddress: ip,
      });
    expect((await register(one, '10.3.3.3')).statusCode).toBe(201);
    expect((await register(two, '10.3.3.3')).statusCode).toBe(201);
    expect((await register(one, '10.3.3.3')).statusCode).toBe(201);
    const seconds = expectThrottled(await register(two, '10.3.3.3'), 3600);
    expect(seconds).toBeGreaterThan(3500);
    expect((await register(one, '10.4.4.4')).statusCode).toBe(201);
    // An hour later the IP may register again.
    await one.db.query(`UPDATE registrations SET at = at - interval '61 minutes'`);
    expect((await register(one, '10.3.3.3')).statusCode).toBe(201);
  });

  it('lets no more than the limit through when registrations from one IP arrive all at once', async () => {
    const { app: one } = await freshApp({ REGISTRATIONS_PER_IP_PER_HOUR: '3' });
    const { app: two } = await buildTestApp(db(), { REGISTRATIONS_PER_IP_PER_HOUR: '3' });
    const responses = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        new TestClient(i % 2 ? two : one).request({
          method: 'POST',
          url: '/api/auth/register',
          payload: { username: username(), password: PASSWORD },
          remoteAddress: '10.3.5.5',
        }),
      ),
    );
    const statuses = responses.map((r) => r.statusCode);
    expect(statuses.filter((s) => s === 201).length).toBeLessThanOrEqual(3);
    expect(statuses.filter((s) => s !== 201).every((s) => s === 429)).toBe(true);
  });

  it('checks whether the name is taken before it spends time hashing the password', async () => {
    // A high hashing cost, so that the hash dominates the time of a registration.
    const { app } = await freshApp({ ARGON2_MEMORY_KIB: '65536', ARGON2_TIME_COST: '6' });
    const register = async (name: string) => {
      const start = performance.now();
      const response = await new TestClient(app).request({
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: name, password: PASSWORD },
      });
      return { status: response.statusCode, ms: performance.now() - start };
    };
    // Warm: the dummy hashes A computes at start are done.
    expect((await register(username())).status).toBe(201);
    const name = username();
    const created = await register(name);
    expect(created.status).toBe(201);
    const taken = await register(name);
    expect(taken.status).toBe(409);
    expect(taken.ms, `taken ${taken.ms} ms, created ${created.ms} ms`).toBeLessThan(created.ms / 3);
  });
});

describe('the owner is never locked out by an attacker', () => {
  it('a browser that signed in before gets in past a full account count; others stay throttled', async () => {
    const { app } = await freshApp();
    const owner = new TestClient(app);
    const user = await owner.register(username(), PASSWORD);
    expect((await owner.request({ method: 'POST', url: '/api/auth/logout' })).statusCode).toBe(204);

    // The attacker keeps the account's count full.
    for (let i = 0; i < 5; i++)
      expectError(await attempt(app, user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    expectThrottled(await attempt(app, user.username, PASSWORD));

    // The owner's browser (its device cookie) is not subject to the account's count.
    expect((await owner.login(user.username, PASSWORD)).statusCode).toBe(200);
    expect((await owner.request({ method: 'GET', url: '/api/me' })).statusCode).toBe(200);

    // A device cookie is no free pass for guessing: it has an allowance of its own.
    await owner.request({ method: 'POST', url: '/api/auth/logout' });
    for (let i = 0; i < 5; i++)
      expectError(await owner.login(user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    expectThrottled(await owner.login(user.username, PASSWORD));

    // A forged or another account's device cookie counts as none.
    const forger = new TestClient(app);
    forger.cookies.set('device', `${user.id}.forged`);
    expectThrottled(await forger.login(user.username, PASSWORD));
  });
});

describe('device cookies live under the credential version', () => {
  /** `n` browsers that each signed in to the account (each holds a device cookie), signed out again. */
  async function devices(app: FastifyInstance, name: string, n: number) {
    const browsers: TestClient[] = [];
    for (let i = 0; i < n; i++) {
      const browser = new TestClient(app);
      expect((await browser.login(name, PASSWORD)).statusCode).toBe(200);
      expect((await browser.request({ method: 'POST', url: '/api/auth/logout' })).statusCode).toBe(204);
      browsers.push(browser);
    }
    return browsers;
  }

  /** Five wrong guesses from each browser: the answers' statuses, in order. */
  async function guesses(name: string, browsers: TestClient[]) {
    const statuses: number[] = [];
    for (const browser of browsers)
      for (let i = 0; i < 5; i++) statuses.push((await browser.login(name, WRONG)).statusCode);
    return statuses;
  }

  it('six cookies collected before a password change give no extra guesses after it', async () => {
    const { app } = await freshApp();
    const owner = new TestClient(app);
    const user = await owner.register(username(), PASSWORD);
    const collected = await devices(app, user.username, 6);
    const changed = await owner.request({
      method: 'POST',
      url: '/api/auth/password',
      payload: { currentPassword: PASSWORD, newPassword: 'a brand new password' },
    });
    expect(changed.statusCode).toBe(204);

    // The old cookies count as none: the account's five, then 429, for all six browsers together.
    const statuses = await guesses(user.username, collected);
    expect(statuses.filter((status) => status === 401)).toHaveLength(5);
    expect(statuses.slice(5).every((status) => status === 429)).toBe(true);
    // The owner's browser, re-issued its cookie by the change, still gets in.
    await owner.request({ method: 'POST', url: '/api/auth/logout' });
    expect((await owner.login(user.username, 'a brand new password')).statusCode).toBe(200);
  });

  it("counts the failures of all the account's devices toward one ceiling", async () => {
    const { app } = await freshApp();
    const user = await registered(app);
    const [first, second, third] = (await devices(app, user.username, 3)) as [
      TestClient,
      TestClient,
      TestClient,
    ];
    for (let i = 0; i < 3; i++)
      expectError(await first.login(user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    for (let i = 0; i < 2; i++)
      expectError(await second.login(user.username, WRONG), 401, 'INVALID_CREDENTIALS');
    // Five in all: every device is refused now, even with the right password.
    expectThrottled(await second.login(user.username, WRONG));
    expectThrottled(await third.login(user.username, PASSWORD));
    expectThrottled(await first.login(user.username, PASSWORD));
    // After the window, a device signs in again, and that clears the devices' count.
    await app.db.query(`UPDATE login_failures SET at = at - interval '16 minutes'`);
    expect((await third.login(user.username, PASSWORD)).statusCode).toBe(200);
  });

  it.each([
    ['the API', (owner: TestClient) => owner.request({ method: 'DELETE', url: '/api/sessions' })],
    [
      'the sessions page',
      async (owner: TestClient) =>
        owner.request({
          method: 'POST',
          url: '/sessions/end-others',
          payload: `_csrf=${encodeURIComponent(await owner.csrfToken())}`,
          headers: { 'content-type': 'application/x-www-form-urlencoded' },
        }),
    ],
  ])(
    '"sign out everywhere else" (%s) retires every other device cookie, and keeps this one',
    async (_, signOutOthers) => {
      const { app } = await freshApp();
      const owner = new TestClient(app);
      const user = await owner.register(username(), PASSWORD);
      const collected = await devices(app, user.username, 6);
      expect([204, 303]).toContain((await signOutOthers(owner)).statusCode);

      const statuses = await guesses(user.username, collected);
      expect(statuses.filter((status) => status === 401)).toHaveLength(5);
      expect(statuses.slice(5).every((status) => status === 429)).toBe(true);
      // The account's count is full, but the browser that signed the others out is still a known device.
      await owner.request({ method: 'POST', url: '/api/auth/logout' });
      expect((await owner.login(user.username, PASSWORD)).statusCode).toBe(200);
    },
  );
});

describe('clean-up', () => {
  it('drops failures and registrations past their window, keeps the recent ones', async () => {
    const { app } = await freshApp();
    await app.db.query('DELETE FROM registrations');
    await attempt(app, username(), WRONG);
    await attempt(app, username(), WRONG);
    await new TestClient(app).register();
    await new TestClient(app).register();
    await app.db.query(
      `UPDATE login_failures SET at = at - interval '16 minutes' WHERE id = (SELECT min(id) FROM login_failures)`,
    );
    await app.db.query(
      `UPDATE registrations SET at = at - interval '61 minutes' WHERE id = (SELECT min(id) FROM registrations)`,
    );
    await app.repos.loginFailures.deleteOlderThan(15 * 60);
    await app.repos.registrations.deleteOlderThan(3600);
    expect(await count(app, 'login_failures')).toBe(1);
    expect(await count(app, 'registrations')).toBe(1);
  });
});
