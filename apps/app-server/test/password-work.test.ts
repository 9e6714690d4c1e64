import { describe, expect, it } from 'vitest';
import { passwordHasher } from '../src/passwords.ts';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError } from './test-utils.ts';

const db = useTestDatabase();

// Costly enough that work started together is still running when the next request arrives.
const SLOW = { ARGON2_MEMORY_KIB: '65536', ARGON2_TIME_COST: '4' };

describe('the argon2 queue (ARGON2_CONCURRENCY, ARGON2_QUEUE_MAX)', () => {
  it('runs at most `concurrency` at once, lets `queueMax` wait, and sheds the rest with BUSY at once', async () => {
    const passwords = passwordHasher({ memoryKib: 64, timeCost: 1 }, { concurrency: 2, queueMax: 1 });
    const work = Array.from({ length: 5 }, (_, i) => passwords.hash(`password ${i}`));
    expect(passwords.load()).toEqual({ running: 2, waiting: 1 });
    const settled = await Promise.allSettled(work);
    expect(settled.map((result) => result.status)).toEqual([
      'fulfilled',
      'fulfilled',
      'fulfilled',
      'rejected',
      'rejected',
    ]);
    for (const result of settled.slice(3))
      expect((result as PromiseRejectedResult).reason).toMatchObject({ code: 'BUSY', statusCode: 503 });
    // Verifications share the same bound; once the work is done there is room again.
    expect(passwords.load()).toEqual({ running: 0, waiting: 0 });
    const hash = (settled[0] as PromiseFulfilledResult<string>).value;
    const checks = [
      passwords.verify(hash, 'password 0'),
      passwords.verify(hash, 'x'),
      passwords.verify(hash, 'y'),
    ];
    await expect(passwords.verify(hash, 'password 0')).rejects.toMatchObject({ code: 'BUSY' });
    expect(await Promise.all(checks)).toEqual([true, false, false]);
  });

  it('share work is shed once half the queue waits, and account work goes ahead of it', async () => {
    const passwords = passwordHasher({ memoryKib: 64, timeCost: 1 }, { concurrency: 1, queueMax: 2 });
    const done: string[] = [];
    const track = (name: string, work: Promise<string>) => work.then(() => done.push(name));
    const shares = [
      track('share one', passwords.shares.hash('share one')),
      track('share two', passwords.shares.hash('share two')),
    ];
    await expect(passwords.shares.hash('share three')).rejects.toMatchObject({ code: 'BUSY' });
    const signIn = track('sign-in', passwords.hash('an account password'));
    expect(passwords.load()).toEqual({ running: 1, waiting: 2 });
    await expect(passwords.hash('one more account')).rejects.toMatchObject({ code: 'BUSY' });
    await Promise.all([...shares, signIn]);
    // The sign-in came after share two, and ran before it.
    expect(done).toEqual(['share one', 'sign-in', 'share two']);
  });

  it('a queue of 0 sheds everything past the running ones', async () => {
    const passwords = passwordHasher({ memoryKib: 64, timeCost: 1 }, { concurrency: 1, queueMax: 0 });
    const first = passwords.hash('one password');
    await expect(passwords.hash('another password')).rejects.toMatchObject({ code: 'BUSY' });
    await first;
    await expect(passwords.hash('another password')).resolves.toMatch(/^\$argon2id\$/);
  });

  it("a flood of password-share creations is shed with 503 BUSY and Retry-After, and another user's sign-in gets through", async () => {
    const database = db();
    const env = {
      ...SLOW,
      ARGON2_CONCURRENCY: '1',
      ARGON2_QUEUE_MAX: '2',
      SHARE_CREATIONS_PER_USER_PER_HOUR: '100',
    };
    const { app } = await buildTestApp(database, env);
    const flooder = new TestClient(app);
    const attacker = await flooder.register();
    const upload = await flooder.upload('bait.txt', 'bytes');
    const fileId = upload.json<{ file: { id: string } }>().file.id;
    const victim = new TestClient(app);
    const user = await victim.register();
    await victim.csrfToken();
    await flooder.csrfToken();

    const creations = Array.from({ length: 8 }, () =>
      flooder.request({
        method: 'POST',
        url: `/api/files/${fileId}/shares`,
        payload: { password: 'open sesame!' },
      }),
    );
    const signIn = victim.login(user.username, 'correct horse battery');
    const responses = await Promise.all(creations);
    const statuses = responses.map((r) => r.statusCode);
    expect(statuses.every((s) => s === 201 || s === 503)).toBe(true);
    const shed = responses.filter((r) => r.statusCode === 503);
    expect(shed.length).toBeGreaterThan(0);
    for (const response of shed) {
      expectError(response, 503, 'BUSY');
      expect(Number(response.headers['retry-after'])).toBeGreaterThan(0);
    }
    // Nothing half-made: a shed creation left no share behind.
    expect(await count(app, 'shares WHERE user_id = $1', [attacker.id])).toBe(
      statuses.filter((s) => s === 201).length,
    );
    // Share work may fill only half the queue: the sign-in waits its turn and is never shed.
    expect((await signIn).statusCode).toBe(200);
  });

  it('a shed sign-in, share download or registration is BUSY, and a shed share password counts as no guess', async () => {
    const database = db();
    const env = { ...SLOW, ARGON2_CONCURRENCY: '1', ARGON2_QUEUE_MAX: '0' };
    const { app } = await buildTestApp(database, env);
    const client = new TestClient(app);
    const user = await client.register();
    const upload = await client.upload('report.pdf', 'bytes');
    const fileId = upload.json<{ file: { id: string } }>().file.id;
    const created = await client.request({
      method: 'POST',
      url: `/api/files/${fileId}/shares`,
      payload: { password: 'open sesame!' },
    });
    const shareId = created.json<{ share: { id: string } }>().share.id;
    const guess = (ip: string) =>
      app.inject({
        method: 'POST',
        url: `/api/shares/${shareId}/download-token`,
        payload: { password: 'wrong guess' },
        remoteAddress: ip,
      });
    const other = new TestClient(app);
    await other.csrfToken();
    const newcomer = new TestClient(app);
    await newcomer.csrfToken();
    const [a, b, c, d] = await Promise.all([
      guess('10.3.0.1'),
      guess('10.3.0.2'),
      other.login(user.username, 'correct horse battery'),
      newcomer.request({
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: 'newcomer', password: 'correct horse battery' },
      }),
    ]);
    const all = [a, b, c];
    expect(all.filter((r) => r.statusCode === 503).length).toBeGreaterThan(0);
    for (const response of all.filter((r) => r.statusCode === 503)) expectError(response, 503, 'BUSY');
    // Only verified wrong passwords are failures.
    const verified = [a, b].filter((r) => r.statusCode === 401).length;
    expect(await count(app, 'share_password_failures WHERE share_id = $1', [shareId])).toBe(verified);
    // A registration hashes through the same queue: made, or shed whole.
    expect([201, 503]).toContain(d.statusCode);
    if (d.statusCode === 503) expect(await count(app, "users WHERE username = 'newcomer'")).toBe(0);
  });

  it('the sign-in form says the server is busy instead of answering a browser with JSON', async () => {
    const { app } = await buildTestApp(db(), { ...SLOW, ARGON2_CONCURRENCY: '1', ARGON2_QUEUE_MAX: '0' });
    const client = new TestClient(app);
    const user = await client.register();
    await client.request({ method: 'POST', url: '/api/auth/logout' });
    const browsers = [new TestClient(app), new TestClient(app), new TestClient(app)];
    const responses = await Promise.all(
      browsers.map(async (browser) =>
        browser.request({
          method: 'POST',
          url: '/login',
          payload: new URLSearchParams({
            username: user.username,
            password: 'correct horse battery',
            _csrf: await browser.csrfToken(),
          }).toString(),
          headers: { 'content-type': 'application/x-www-form-urlencoded' },
          csrf: false,
        }),
      ),
    );
    expect(responses.every((r) => r.statusCode === 303)).toBe(true);
    const refused = responses.findIndex((r) => r.headers.location?.startsWith('/login'));
    expect(refused).toBeGreaterThanOrEqual(0);
    const page = await browsers[refused]?.request({ method: 'GET', url: '/login' });
    expect(page?.body).toContain('The server is busy right now.');
  });
});
