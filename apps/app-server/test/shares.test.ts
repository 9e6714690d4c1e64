import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';
import { PUBLIC_REQUESTS_PER_MINUTE_PER_IP } from '../src/routes/shares.ts';
import { buildTestApp, claimsOf, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError, setCookies } from './test-utils.ts';

const db = useTestDatabase();

interface ShareView {
  id: string;
  url: string;
  fileId: string;
  fileName: string;
  expiresAt: string;
  maxDownloads: number | null;
  downloads: number;
  lastDownloadAt: string | null;
  hasPassword: boolean;
  createdAt: string;
  revokedAt: string | null;
  recentFailures: number;
}

async function owner(app: FastifyInstance, name = 'report.pdf') {
  const client = new TestClient(app);
  const user = await client.register();
  const upload = await client.upload(name, 'shared bytes', 'application/pdf');
  expect(upload.statusCode).toBe(201);
  const file = upload.json<{ file: { id: string; name: string } }>().file;
  return { client, user, file };
}

async function share(client: TestClient, fileId: string, body: Record<string, unknown> = {}) {
  const response = await client.request({
    method: 'POST',
    url: `/api/files/${fileId}/shares`,
    payload: body,
  });
  expect(response.statusCode, response.body).toBe(201);
  return response.json<{ share: ShareView }>().share;
}

/** A download through the share's JSON route, by a client with no cookies at all. */
const publicToken = (
  app: FastifyInstance,
  id: string,
  body?: Record<string, unknown>,
  remoteAddress = '127.0.0.1',
) =>
  app.inject({
    method: 'POST',
    url: `/api/shares/${id}/download-token`,
    remoteAddress,
    ...(body && { payload: body }),
  });

/** The share page's form post, as a browser sends it (a urlencoded body, with the password if any). */
const formPost = (
  app: FastifyInstance,
  id: string,
  options: { headers?: Record<string, string | undefined>; password?: string; remoteAddress?: string } = {},
) =>
  app.inject({
    method: 'POST',
    url: `/s/${id}/download`,
    headers: { ...options.headers, 'content-type': 'application/x-www-form-urlencoded' },
    payload:
      options.password === undefined ? '' : new URLSearchParams({ password: options.password }).toString(),
    ...(options.remoteAddress && { remoteAddress: options.remoteAddress }),
  });

describe('owner API', () => {
  it('creates a share with the defaults and the documented shape', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const before = Date.now();
    const created = await share(client, file.id);
    expect(created).toEqual({
      id: expect.stringMatching(/^[A-Za-z0-9_-]{22}$/),
      url: `http://a.test/s/${created.id}`,
      fileId: file.id,
      fileName: 'report.pdf',
      expiresAt: expect.any(String),
      maxDownloads: null,
      downloads: 0,
      lastDownloadAt: null,
      hasPassword: false,
      createdAt: expect.any(String),
      revokedAt: null,
      recentFailures: 0,
    });
    // 7 days by default.
    expect(Math.abs(Date.parse(created.expiresAt) - (before + 604_800_000))).toBeLessThan(10_000);
  });

  it('takes expiry, limit and password; the hash is argon2id, never the password', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, {
      expiresInSeconds: 3600,
      maxDownloads: 2,
      password: 'open sesame!',
    });
    expect(created).toMatchObject({ maxDownloads: 2, hasPassword: true });
    const { rows } = await app.db.query<{ password_hash: string }>(
      'SELECT password_hash FROM shares WHERE id = $1',
      [created.id],
    );
    expect(rows[0]?.password_hash).toMatch(/^\$argon2id\$/);
  });

  it.each([
    [{ expiresInSeconds: 59 }],
    [{ expiresInSeconds: 2_592_001 }],
    [{ expiresInSeconds: 1.5 }],
    [{ maxDownloads: 0 }],
    [{ maxDownloads: -1 }],
    [{ maxDownloads: 2_147_483_648 }],
    [{ password: 'short' }],
    [{ password: 'x'.repeat(1025) }],
  ])('refuses %j with 400 VALIDATION_FAILED', async (body) => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    expectError(
      await client.request({ method: 'POST', url: `/api/files/${file.id}/shares`, payload: body }),
      400,
      'VALIDATION_FAILED',
    );
  });

  it("is IDOR-safe: another user's file and share are 404, and lists hold one's own only", async () => {
    const { app } = await buildTestApp(db());
    const alice = await owner(app);
    const bob = await owner(app);
    const created = await share(alice.client, alice.file.id);
    expectError(
      await bob.client.request({ method: 'POST', url: `/api/files/${alice.file.id}/shares`, payload: {} }),
      404,
      'NOT_FOUND',
    );
    expectError(
      await bob.client.request({ method: 'DELETE', url: `/api/shares/${created.id}` }),
      404,
      'NOT_FOUND',
    );
    const bobs = await bob.client.request({ method: 'GET', url: '/api/shares' });
    expect(bobs.json()).toEqual({ shares: [] });
    const alices = await alice.client.request({ method: 'GET', url: '/api/shares' });
    expect(alices.json<{ shares: ShareView[] }>().shares.map((s) => s.id)).toEqual([created.id]);
    // Bob's attempt revoked nothing.
    expect((await publicToken(app, created.id)).statusCode).toBe(201);
  });

  it('needs a signed-in user and the CSRF token', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    expectError(await app.inject({ method: 'GET', url: '/api/shares' }), 401, 'UNAUTHENTICATED');
    expectError(
      await client.request({ method: 'POST', url: `/api/files/${file.id}/shares`, payload: {}, csrf: false }),
      403,
      'CSRF_INVALID',
    );
  });

  it('revoking is at once: the next download is 404, the list shows revokedAt', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    expect((await publicToken(app, created.id)).statusCode).toBe(201);
    const revoke = await client.request({ method: 'DELETE', url: `/api/shares/${created.id}` });
    expect(revoke.statusCode).toBe(204);
    expectError(await publicToken(app, created.id), 404, 'NOT_FOUND');
    const [listed] = (await client.request({ method: 'GET', url: '/api/shares' })).json<{
      shares: ShareView[];
    }>().shares;
    expect(listed).toMatchObject({ id: created.id, downloads: 1, revokedAt: expect.any(String) });
    expect(listed?.lastDownloadAt).toEqual(expect.any(String));
  });

  it("deleting the file ends its shares (404), and the file's other data with it", async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    expect((await client.request({ method: 'DELETE', url: `/api/files/${file.id}` })).statusCode).toBe(204);
    expectError(await publicToken(app, created.id), 404, 'NOT_FOUND');
    expect(await count(app, 'shares WHERE id = $1', [created.id])).toBe(0);
    expect((await app.inject({ method: 'GET', url: `/s/${created.id}` })).statusCode).toBe(404);
  });
});

describe('creating shares is bounded', () => {
  const create = (
    client: TestClient,
    fileId: string,
    body: Record<string, unknown> = {},
    remoteAddress?: string,
  ) =>
    client.request({
      method: 'POST',
      url: `/api/files/${fileId}/shares`,
      payload: body,
      ...(remoteAddress && { remoteAddress }),
    });

  it('per user and hour (SHARE_CREATIONS_PER_USER_PER_HOUR): 429 with Retry-After; a refused one does not count', async () => {
    const { app } = await buildTestApp(db(), { SHARE_CREATIONS_PER_USER_PER_HOUR: '2' });
    const { client, user, file } = await owner(app);
    const ip = '10.2.0.1';
    expect((await create(client, file.id, { password: 'open sesame!' }, ip)).statusCode).toBe(201);
    expect((await create(client, file.id, {}, ip)).statusCode).toBe(201);
    const limited = await create(client, file.id, { password: 'open sesame!' }, ip);
    expectError(limited, 429, 'RATE_LIMITED');
    expect(Number(limited.headers['retry-after'])).toBeGreaterThan(3500);
    expectError(await create(client, file.id, {}, ip), 429, 'RATE_LIMITED');
    expect(await count(app, 'share_creations WHERE user_id = $1', [user.id])).toBe(2);
    expect(await count(app, 'shares WHERE user_id = $1', [user.id])).toBe(2);
    // Another user from the same address goes on.
    const other = await owner(app);
    expect((await create(other.client, other.file.id, {}, ip)).statusCode).toBe(201);
  });

  it('per client IP and hour, over all accounts (SHARE_CREATIONS_PER_IP_PER_HOUR), across replicas', async () => {
    const database = db();
    const env = { SHARE_CREATIONS_PER_IP_PER_HOUR: '3' };
    const { app } = await buildTestApp(database, env);
    const { app: replica } = await buildTestApp(database, env);
    const accounts = [await owner(app), await owner(replica), await owner(app), await owner(replica)];
    const ip = '10.2.1.1';
    for (const { client, file } of accounts.slice(0, 3))
      expect((await create(client, file.id, {}, ip)).statusCode).toBe(201);
    const [, , , fourth] = accounts;
    expectError(
      await create(fourth?.client as TestClient, fourth?.file.id ?? '', {}, ip),
      429,
      'RATE_LIMITED',
    );
    expect(
      (await create(fourth?.client as TestClient, fourth?.file.id ?? '', {}, '10.2.1.2')).statusCode,
    ).toBe(201);
  });

  it('caps live shares per file (MAX_LIVE_SHARES_PER_FILE) with 409 TOO_MANY_SHARES; revoked and expired ones do not count', async () => {
    const { app } = await buildTestApp(db(), { MAX_LIVE_SHARES_PER_FILE: '2' });
    const { client, file } = await owner(app);
    const first = await share(client, file.id);
    await share(client, file.id, { password: 'open sesame!' });
    const refused = await create(client, file.id, { password: 'open sesame!' });
    expectError(refused, 409, 'TOO_MANY_SHARES');
    expect(refused.json<{ message: string }>().message).toContain('2 live share links to this file');
    // Another file of the same user is not held up.
    const upload = await client.upload('other.txt', 'more bytes');
    const otherFile = upload.json<{ file: { id: string } }>().file.id;
    expect((await create(client, otherFile)).statusCode).toBe(201);
    // Revoked: room for one more.
    await client.request({ method: 'DELETE', url: `/api/shares/${first.id}` });
    const third = await share(client, file.id);
    expectError(await create(client, file.id), 409, 'TOO_MANY_SHARES');
    // Expired, or used up: no longer live either.
    await app.db.query("UPDATE shares SET expires_at = now() - interval '1 second' WHERE id = $1", [
      third.id,
    ]);
    const limited = await share(client, file.id, { maxDownloads: 1 });
    expectError(await create(client, file.id), 409, 'TOO_MANY_SHARES');
    expect((await publicToken(app, limited.id)).statusCode).toBe(201);
    expect((await create(client, file.id)).statusCode).toBe(201);
  });

  it('caps live shares per user (MAX_LIVE_SHARES_PER_USER) exactly, also under concurrent creations on two replicas', async () => {
    const database = db();
    const env = { MAX_LIVE_SHARES_PER_USER: '3' };
    const { app } = await buildTestApp(database, env);
    const { app: replica } = await buildTestApp(database, env);
    const { client, user, file } = await owner(app);
    const upload = await client.upload('other.txt', 'more bytes');
    const otherFile = upload.json<{ file: { id: string } }>().file.id;
    const onReplica = new TestClient(replica);
    onReplica.cookies = client.cookies;
    const responses = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        create(
          i % 2 ? onReplica : client,
          i % 3 ? file.id : otherFile,
          i % 4 ? {} : { password: 'open sesame!' },
        ),
      ),
    );
    const statuses = responses.map((r) => r.statusCode);
    expect(statuses.filter((s) => s === 201)).toHaveLength(3);
    expect(statuses.filter((s) => s === 409)).toHaveLength(7);
    expect(await count(app, 'shares WHERE user_id = $1', [user.id])).toBe(3);
    const refused = responses.find((r) => r.statusCode === 409);
    expect(refused?.json<{ message: string }>().message).toContain('3 live share links of yours');
  });

  it('the share form on the file list says why it was refused', async () => {
    const { app } = await buildTestApp(db(), {
      SHARE_CREATIONS_PER_USER_PER_HOUR: '2',
      MAX_LIVE_SHARES_PER_FILE: '1',
    });
    const { client, file } = await owner(app);
    const post = () =>
      client.request({
        method: 'POST',
        url: `/files/${file.id}/shares`,
        payload: '',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
      });
    expect((await post()).headers.location).toBe('/shares');
    expect((await post()).headers.location).toBe('/');
    expect((await client.request({ method: 'GET', url: '/' })).body).toContain(
      'There are already 1 live share links to this file; revoke one first',
    );
    expect((await post()).headers.location).toBe('/');
    expect((await client.request({ method: 'GET', url: '/' })).body).toContain(
      'Too many share links were created in the last hour. Try again in',
    );
  });
});

describe('downloads through a share', () => {
  it('mints a token for share:<id> with shr, counted, without any cookie', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { maxDownloads: 5 });
    const response = await publicToken(app, created.id);
    expect(response.statusCode).toBe(201);
    expect(setCookies(response)).toEqual([]);
    const body = response.json<{ url: string; token: string; expiresAt: string }>();
    expect(body.url).toBe(`http://b.test/d/${body.token}/report.pdf`);
    const claims = await claimsOf(app, body.token);
    expect(claims).toMatchObject({
      sub: `share:${created.id}`,
      shr: created.id,
      fid: file.id,
      name: 'report.pdf',
    });
    const [listed] = (await client.request({ method: 'GET', url: '/api/shares' })).json<{
      shares: ShareView[];
    }>().shares;
    expect(listed?.downloads).toBe(1);
    const metrics = await app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toMatch(/tokens_minted_total\{kind="share"\} 1/);
  });

  it('the form post answers 303 to a fresh B URL, counted once per post', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    const form = await formPost(app, created.id, { headers: { origin: 'http://a.test' } });
    expect(form.statusCode).toBe(303);
    expect(form.headers.location).toMatch(/^http:\/\/b\.test\/d\/[\w-]+\.[\w-]+\.[\w-]+\/report\.pdf$/);
    expect(form.headers['cache-control']).toBe('no-store');
    expect(setCookies(form)).toEqual([]);
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 1', [created.id])).toBe(1);
  });

  it('refuses a cross-site post (Origin, Sec-Fetch-Site) and counts nothing', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    for (const headers of [
      { origin: 'http://evil.test' },
      { 'sec-fetch-site': 'cross-site' },
      { 'sec-fetch-site': 'same-site', origin: 'null' },
      { origin: 'null' },
      { 'sec-fetch-site': 'same-origin', origin: 'http://evil.test' },
    ]) {
      expectError(
        await app.inject({ method: 'POST', url: `/api/shares/${created.id}/download-token`, headers }),
        403,
        'CSRF_INVALID',
      );
      const form = await formPost(app, created.id, { headers });
      expect(form.statusCode).toBe(403);
    }
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 0', [created.id])).toBe(1);
  });

  it("accepts the page's own form post as a browser sends it from a no-referrer page (Origin: null)", async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    const form = await formPost(app, created.id, {
      headers: { origin: 'null', 'sec-fetch-site': 'same-origin' },
    });
    expect(form.statusCode).toBe(303);
  });

  it('maxDownloads: after the last one, 410 SHARE_EXPIRED', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { maxDownloads: 2 });
    expect((await publicToken(app, created.id)).statusCode).toBe(201);
    expect((await publicToken(app, created.id)).statusCode).toBe(201);
    expectError(await publicToken(app, created.id), 410, 'SHARE_EXPIRED');
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 2', [created.id])).toBe(1);
  });

  it('an expired share is 410 SHARE_EXPIRED; an unknown one 404; a malformed id 400', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { expiresInSeconds: 60 });
    await app.db.query("UPDATE shares SET expires_at = now() - interval '1 second' WHERE id = $1", [
      created.id,
    ]);
    expectError(await publicToken(app, created.id), 410, 'SHARE_EXPIRED');
    expectError(await publicToken(app, 'AAAAAAAAAAAAAAAAAAAAAA'), 404, 'NOT_FOUND');
    expectError(await publicToken(app, 'not a share!'), 400, 'VALIDATION_FAILED');
  });

  it('20 concurrent downloads with maxDownloads 3, across two replicas: exactly 3 tokens', async () => {
    const database = db();
    const { app } = await buildTestApp(database);
    const { app: replica } = await buildTestApp(database);
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { maxDownloads: 3 });
    const responses = await Promise.all(
      Array.from({ length: 20 }, (_, i) => publicToken(i % 2 ? replica : app, created.id)),
    );
    const statuses = responses.map((r) => r.statusCode).sort();
    expect(statuses.filter((s) => s === 201)).toHaveLength(3);
    expect(statuses.filter((s) => s === 410)).toHaveLength(17);
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 3', [created.id])).toBe(1);
  });

  it("share downloads have a budget of their own (429 RATE_LIMITED), and never spend the owner's MINT_RATE_PER_MINUTE", async () => {
    const { app } = await buildTestApp(db(), { MINT_RATE_PER_MINUTE: '2', SHARE_MINT_RATE_PER_MINUTE: '3' });
    const { client, user, file } = await owner(app);
    const created = await share(client, file.id);
    // Recipients at several addresses, each well within the public per-IP limits.
    for (let i = 0; i < 3; i++)
      expect((await publicToken(app, created.id, {}, `10.1.0.${i}`)).statusCode).toBe(201);
    const limited = await publicToken(app, created.id, {}, '10.1.0.9');
    expectError(limited, 429, 'RATE_LIMITED');
    expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 3', [created.id])).toBe(1);
    // The owner's own downloads are untouched: both of their 2 a minute are still there.
    const own = () => client.request({ method: 'POST', url: `/api/files/${file.id}/download-token` });
    expect((await own()).statusCode).toBe(201);
    expect((await own()).statusCode).toBe(201);
    expectError(await own(), 429, 'RATE_LIMITED');
    expect(await count(app, 'mint_counts WHERE user_id = $1 AND count = 3', [user.id])).toBe(1);
    // And the owner's spending does not take from the share's budget either: another share of
    // the file has its own.
    const other = await share(client, file.id);
    expect((await publicToken(app, other.id, {}, '10.1.0.10')).statusCode).toBe(201);
  });

  it("all of an owner's shares together are within SHARE_MINT_RATE_PER_OWNER_PER_MINUTE, across replicas", async () => {
    const database = db();
    const env = { SHARE_MINT_RATE_PER_OWNER_PER_MINUTE: '3' };
    const { app } = await buildTestApp(database, env);
    const { app: replica } = await buildTestApp(database, env);
    const { client, file } = await owner(app);
    const one = await share(client, file.id);
    const two = await share(client, file.id);
    expect((await publicToken(app, one.id, {}, '10.1.1.1')).statusCode).toBe(201);
    expect((await publicToken(replica, two.id, {}, '10.1.1.2')).statusCode).toBe(201);
    expect((await publicToken(replica, one.id, {}, '10.1.1.3')).statusCode).toBe(201);
    expectError(await publicToken(app, two.id, {}, '10.1.1.4'), 429, 'RATE_LIMITED');
    // Another owner's shares have their own budget.
    const other = await owner(app);
    expect(
      (await publicToken(app, (await share(other.client, other.file.id)).id, {}, '10.1.1.5')).statusCode,
    ).toBe(201);
    // The owner's own downloads still work.
    expect(
      (await client.request({ method: 'POST', url: `/api/files/${file.id}/download-token` })).statusCode,
    ).toBe(201);
  });

  it('limits download posts per client IP tighter than page views (SHARE_DOWNLOADS_PER_IP_PER_MINUTE), form and JSON together', async () => {
    const { app } = await buildTestApp(db(), { SHARE_DOWNLOADS_PER_IP_PER_MINUTE: '3' });
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    const ip = '10.1.2.1';
    expect((await publicToken(app, created.id, {}, ip)).statusCode).toBe(201);
    expect((await formPost(app, created.id, { remoteAddress: ip })).statusCode).toBe(303);
    expect((await publicToken(app, created.id, {}, ip)).statusCode).toBe(201);
    const limited = await publicToken(app, created.id, {}, ip);
    expectError(limited, 429, 'RATE_LIMITED');
    expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
    expect((await formPost(app, created.id, { remoteAddress: ip })).statusCode).toBe(429);
    // The page itself still shows, and another address still downloads.
    const page = await app.inject({ method: 'GET', url: `/s/${created.id}`, remoteAddress: ip });
    expect(page.statusCode).toBe(200);
    expect((await publicToken(app, created.id, {}, '10.1.2.2')).statusCode).toBe(201);
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 4', [created.id])).toBe(1);
  });
});

describe('share passwords', () => {
  it('a right password downloads; a wrong or missing one is 401 INVALID_CREDENTIALS and counts nothing', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    expectError(await publicToken(app, created.id), 401, 'INVALID_CREDENTIALS');
    expectError(await publicToken(app, created.id, { password: 'open sesame?' }), 401, 'INVALID_CREDENTIALS');
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 0', [created.id])).toBe(1);
    expect((await publicToken(app, created.id, { password: 'open sesame!' })).statusCode).toBe(201);
  });

  it('is throttled per client IP on the share (429 with Retry-After), also for the right password then', async () => {
    const { app } = await buildTestApp(db(), { SHARE_PASSWORD_MAX_FAILURES_PER_IP: '3' });
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    for (let i = 0; i < 3; i++)
      expectError(
        await publicToken(app, created.id, { password: 'wrong guess' }),
        401,
        'INVALID_CREDENTIALS',
      );
    const limited = await publicToken(app, created.id, { password: 'open sesame!' });
    expectError(limited, 429, 'RATE_LIMITED');
    expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
    // Another share of the same owner has its own count.
    const other = await share(client, file.id, { password: 'open sesame!' });
    expect((await publicToken(app, other.id, { password: 'open sesame!' })).statusCode).toBe(201);
  });

  it("one address's wrong passwords lock out only that address: a recipient elsewhere with the right password gets in, on any replica", async () => {
    const database = db();
    const { app } = await buildTestApp(database);
    const { app: replica } = await buildTestApp(database);
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    // The default: 5 wrong passwords per address within the window.
    const guesser = '10.0.0.7';
    for (let i = 0; i < 5; i++)
      expectError(
        await publicToken(i % 2 ? replica : app, created.id, { password: `wrong guess ${i}` }, guesser),
        401,
        'INVALID_CREDENTIALS',
      );
    expectError(
      await publicToken(replica, created.id, { password: 'wrong guess' }, guesser),
      429,
      'RATE_LIMITED',
    );
    expectError(
      await publicToken(app, created.id, { password: 'open sesame!' }, guesser),
      429,
      'RATE_LIMITED',
    );
    // Another address is not held up, on either replica, and not even by its own first mistake.
    expectError(
      await publicToken(app, created.id, { password: 'typo' }, '10.0.0.8'),
      401,
      'INVALID_CREDENTIALS',
    );
    expect(
      (await publicToken(replica, created.id, { password: 'open sesame!' }, '10.0.0.8')).statusCode,
    ).toBe(201);
    expect(
      (await formPost(app, created.id, { password: 'open sesame!', remoteAddress: '10.0.0.9' })).statusCode,
    ).toBe(303);
  });

  it('has a per-share ceiling over all addresses (SHARE_PASSWORD_MAX_FAILURES_PER_SHARE), so guessing from many stays bounded', async () => {
    const { app } = await buildTestApp(db(), { SHARE_PASSWORD_MAX_FAILURES_PER_SHARE: '4' });
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    for (let i = 0; i < 4; i++)
      expectError(
        await publicToken(app, created.id, { password: 'wrong guess' }, `10.0.3.${i}`),
        401,
        'INVALID_CREDENTIALS',
      );
    expectError(
      await publicToken(app, created.id, { password: 'open sesame!' }, '10.0.3.9'),
      429,
      'RATE_LIMITED',
    );
    // Another share has its own count.
    const other = await share(client, file.id, { password: 'open sesame!' });
    expect((await publicToken(app, other.id, { password: 'open sesame!' }, '10.0.3.9')).statusCode).toBe(201);
  });

  it('lets no more than the per-address limit of guesses through when they arrive all at once', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    const responses = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        publicToken(app, created.id, { password: `guess ${i}` }, '10.0.4.1'),
      ),
    );
    const statuses = responses.map((r) => r.statusCode);
    expect(statuses.filter((s) => s === 401).length).toBeLessThanOrEqual(5);
    expect(statuses.filter((s) => s !== 401).every((s) => s === 429)).toBe(true);
  });

  it("shows the owner a share's recent wrong passwords, in the API and on the share list", async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    const quiet = await share(client, file.id, { password: 'open sesame!' });
    for (let i = 0; i < 3; i++)
      await publicToken(app, created.id, { password: 'wrong guess' }, `10.0.5.${i}`);
    // A right password, and a refused attempt, are no failures.
    await publicToken(app, created.id, { password: 'open sesame!' }, '10.0.5.9');
    const { shares } = (await client.request({ method: 'GET', url: '/api/shares' })).json<{
      shares: ShareView[];
    }>();
    expect(shares.find((s) => s.id === created.id)?.recentFailures).toBe(3);
    expect(shares.find((s) => s.id === quiet.id)?.recentFailures).toBe(0);
    const list = await client.request({ method: 'GET', url: '/shares' });
    expect(list.body).toContain('3 wrong passwords in the last 15 minutes');
    expect(list.body.match(/data-failures/g)).toHaveLength(1);
  });

  it('takes as long for a wrong password as for a right one', async () => {
    // A costly hash, so argon2 dominates the database round trips and a skipped one would show.
    const { app } = await buildTestApp(db(), { ARGON2_MEMORY_KIB: '65536', ARGON2_TIME_COST: '8' });
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    const time = async (password: string) => {
      const start = performance.now();
      await publicToken(app, created.id, { password }, '10.0.0.9');
      return performance.now() - start;
    };
    const right: number[] = [];
    const wrong: number[] = [];
    for (let i = 0; i < 3; i++) {
      right.push(await time('open sesame!'));
      wrong.push(await time('open sesame?'));
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
    // Both verify once with argon2; a wrong password answered without it would be far under half.
    expect(median(wrong)).toBeGreaterThan(median(right) * 0.5);
    expect(median(right)).toBeGreaterThan(median(wrong) * 0.5);
  });
});

describe('the share page GET /s/:id', () => {
  const page = (app: FastifyInstance, id: string) =>
    app.inject({ method: 'GET', url: `/s/${id}`, headers: { accept: 'text/html' } });

  it('shows name (control and bidi characters removed), size, expiry, downloads left and a form; counts nothing', async () => {
    const { app } = await buildTestApp(db());
    const { client, user, file } = await owner(app, 'evil\u202Efdp.exe');
    const created = await share(client, file.id, { maxDownloads: 3 });
    for (let i = 0; i < 3; i++) {
      const response = await page(app, created.id);
      expect(response.statusCode).toBe(200);
      expect(response.headers['content-type']).toMatch(/^text\/html/);
      expect(response.body).toContain('evilfdp.exe');
      expect(response.body).not.toContain('\u202E');
      expect(response.body).toContain('12\u00a0B');
      expect(response.body).toContain(`datetime="${created.expiresAt}"`);
      expect(response.body).toMatch(/data-downloads-left>3</);
      expect(response.body).toContain(`<form method="post" action="/s/${created.id}/download">`);
      expect(response.body).not.toContain('name="password"');
      expect(response.body).not.toContain('<script');
    }
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 0', [created.id])).toBe(1);
    expect(await count(app, 'mint_counts WHERE user_id = $1', [user.id])).toBe(0);
  });

  it(`limits one client IP to ${PUBLIC_REQUESTS_PER_MINUTE_PER_IP} public requests a minute (429 with Retry-After); other clients go on`, async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    const from = (remoteAddress: string) =>
      app.inject({ method: 'GET', url: `/s/${created.id}`, headers: { accept: 'text/html' }, remoteAddress });
    for (let i = 0; i < PUBLIC_REQUESTS_PER_MINUTE_PER_IP; i++)
      expect((await from('198.51.100.7')).statusCode).toBe(200);
    const refused = await from('198.51.100.7');
    expect(refused.statusCode).toBe(429);
    expect(Number(refused.headers['retry-after'])).toBeGreaterThan(0);
    const download = await app.inject({
      method: 'POST',
      url: `/api/shares/${created.id}/download-token`,
      payload: {},
      remoteAddress: '198.51.100.7',
    });
    expectError(download, 429, 'RATE_LIMITED');
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 0', [created.id])).toBe(1);
    expect((await from('198.51.100.8')).statusCode).toBe(200);
    // The form of a limited client is refused before validation: its raw id never reaches Postgres.
    const form = await app.inject({ method: 'POST', url: '/s/%00/download', remoteAddress: '198.51.100.7' });
    expect(form.statusCode).toBe(429);
  });

  it('sets no cookie, and says noindex, no-referrer, no-store', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id);
    const response = await page(app, created.id);
    expect(setCookies(response)).toEqual([]);
    expect(response.headers).toMatchObject({
      'cache-control': 'no-store',
      'referrer-policy': 'no-referrer',
      'x-robots-tag': 'noindex, nofollow',
    });
    expect(response.body).toContain('<meta name="robots" content="noindex, nofollow">');
    expect(response.body).toContain('<meta name="referrer" content="no-referrer">');
    // A session cookie that comes along is not touched (no session exists on this route).
    const withCookie = await client.request({ method: 'GET', url: `/s/${created.id}` });
    expect(setCookies(withCookie)).toEqual([]);
  });

  it('has a password field when the share has a password; a wrong one shows the page again with 401', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    expect((await page(app, created.id)).body).toContain('name="password" type="password"');
    const form = (password: string) =>
      formPost(app, created.id, {
        headers: { origin: 'http://a.test' },
        password,
        remoteAddress: '10.0.1.1',
      });
    const wrong = await form('open sesame?');
    expect(wrong.statusCode).toBe(401);
    expect(wrong.body).toContain('That password is not correct.');
    expect(wrong.body).toContain('name="password"');
    expect(setCookies(wrong)).toEqual([]);
    const right = await form('open sesame!');
    expect(right.statusCode).toBe(303);
    expect(right.headers.location).toMatch(/^http:\/\/b\.test\/d\//);
  });

  it('an expired or used-up share is 410 with no Download button; a revoked or unknown one 404', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const used = await share(client, file.id, { maxDownloads: 1 });
    expect((await publicToken(app, used.id)).statusCode).toBe(201);
    const gone = await page(app, used.id);
    expect(gone.statusCode).toBe(410);
    expect(gone.body).toContain('has expired or has no downloads left');
    expect(gone.body).not.toContain('<form');
    const formAfter = await formPost(app, used.id);
    expect(formAfter.statusCode).toBe(410);

    const revoked = await share(client, file.id);
    await client.request({ method: 'DELETE', url: `/api/shares/${revoked.id}` });
    const missing = await page(app, revoked.id);
    expect(missing.statusCode).toBe(404);
    expect(missing.body).toContain('This link does not exist');
    expect((await page(app, 'AAAAAAAAAAAAAAAAAAAAAA')).statusCode).toBe(404);
  });

  it('the form says when it is throttled (429, Retry-After) and when the link was revoked (404)', async () => {
    const { app } = await buildTestApp(db(), { SHARE_PASSWORD_MAX_FAILURES_PER_IP: '1' });
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { password: 'open sesame!' });
    const form = (password?: string) =>
      app.inject({
        method: 'POST',
        url: `/s/${created.id}/download`,
        remoteAddress: '10.0.2.1',
        ...(password === undefined
          ? {}
          : {
              headers: { 'content-type': 'application/x-www-form-urlencoded' },
              payload: new URLSearchParams({ password }).toString(),
            }),
      });
    // No body at all: a missing password, not a malformed request.
    expect((await form()).statusCode).toBe(401);
    const limited = await form('open sesame!');
    expect(limited.statusCode).toBe(429);
    expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
    expect(limited.body).toContain('Too many attempts right now.');
    await client.request({ method: 'DELETE', url: `/api/shares/${created.id}` });
    const revoked = await form('open sesame!');
    expect(revoked.statusCode).toBe(404);
    expect(revoked.body).toContain('This link does not exist');
    expect(revoked.body).not.toContain('flash-error');
  });

  it("a link scanner's GET, HEAD and redirect-following counts nothing", async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const created = await share(client, file.id, { maxDownloads: 1 });
    for (const method of ['GET', 'HEAD'] as const) {
      const response = await app.inject({ method, url: `/s/${created.id}` });
      expect(response.statusCode).toBe(200);
      expect(response.headers.location).toBeUndefined();
    }
    expect((await app.inject({ method: 'GET', url: `/s/${created.id}/download` })).statusCode).toBe(404);
    expect(await count(app, 'shares WHERE id = $1 AND downloads = 0', [created.id])).toBe(1);
    expect((await publicToken(app, created.id)).statusCode).toBe(201);
  });
});

describe("the owner's pages", () => {
  const form = (client: TestClient, url: string, fields: Record<string, string>) =>
    client.request({
      method: 'POST',
      url,
      payload: new URLSearchParams(fields).toString(),
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });

  it('create a link from the file row, list it with downloads and last download, revoke it', async () => {
    const { app } = await buildTestApp(db());
    const { client, file } = await owner(app);
    const files = await client.request({ method: 'GET', url: '/' });
    expect(files.body).toContain(`action="/files/${file.id}/shares"`);
    expect(files.body).toContain('href="/shares"');
    expect((await client.request({ method: 'GET', url: '/sessions' })).body).toContain('href="/shares"');

    const created = await form(client, `/files/${file.id}/shares`, {
      expiresInSeconds: '3600',
      maxDownloads: '',
      password: '',
    });
    expect(created.statusCode).toBe(303);
    expect(created.headers.location).toBe('/shares');
    const [made] = (await client.request({ method: 'GET', url: '/api/shares' })).json<{
      shares: ShareView[];
    }>().shares;
    expect(made).toMatchObject({ maxDownloads: null, hasPassword: false });
    expect(Math.abs(Date.parse(made?.expiresAt ?? '') - Date.now() - 3_600_000)).toBeLessThan(10_000);

    expect((await publicToken(app, made?.id ?? '')).statusCode).toBe(201);
    const list = await client.request({ method: 'GET', url: '/shares' });
    expect(list.statusCode).toBe(200);
    expect(list.body).toContain('Share link for “report.pdf” created: http://a.test/s/');
    expect(list.body).toContain(`value="http://a.test/s/${made?.id}"`);
    expect(list.body).toMatch(/data-downloads>1</);
    expect(list.body).not.toContain('>never<');

    const revoked = await form(client, `/shares/${made?.id}/revoke`, {});
    expect(revoked.statusCode).toBe(303);
    expectError(await publicToken(app, made?.id ?? ''), 404, 'NOT_FOUND');
    const after = await client.request({ method: 'GET', url: '/shares' });
    expect(after.body).toContain('The link is revoked');
    expect(after.body).toContain('Revoked');
    expect(after.body).not.toContain(`value="http://a.test/s/${made?.id}"`);
  });

  it("refuses a bad form with the reason, and another user's file or share with NOT_FOUND", async () => {
    const { app } = await buildTestApp(db());
    const alice = await owner(app);
    const bob = await owner(app);
    const bad = await form(alice.client, `/files/${alice.file.id}/shares`, {
      expiresInSeconds: '10',
      password: 'x',
    });
    expect(bad.statusCode).toBe(303);
    expect((await alice.client.request({ method: 'GET', url: '/' })).body).toContain(
      'expiry of 1 minute to 30 days',
    );
    // No body at all: the defaults, like the JSON route.
    const bare = await alice.client.request({ method: 'POST', url: `/files/${alice.file.id}/shares` });
    expect(bare.statusCode).toBe(303);
    expect(bare.headers.location).toBe('/shares');
    await alice.client.request({
      method: 'DELETE',
      url: `/api/shares/${(await alice.client.request({ method: 'GET', url: '/api/shares' })).json<{ shares: ShareView[] }>().shares[0]?.id}`,
    });
    const theirs = await form(bob.client, `/files/${alice.file.id}/shares`, { expiresInSeconds: '3600' });
    expect(theirs.statusCode).toBe(303);
    expect((await bob.client.request({ method: 'GET', url: '/' })).body).toContain(
      'That file does not exist',
    );
    const made = await share(alice.client, alice.file.id);
    await form(bob.client, `/shares/${made.id}/revoke`, {});
    expect((await bob.client.request({ method: 'GET', url: '/shares' })).body).toContain(
      'That share link does not exist.',
    );
    expect((await publicToken(app, made.id)).statusCode).toBe(201);
    expect(await count(app, 'shares WHERE user_id = $1 AND revoked_at IS NULL', [alice.user.id])).toBe(1);
    expect(await count(app, 'shares WHERE user_id = $1', [bob.user.id])).toBe(0);
  });
});
