import { randomBytes } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { displayFileName } from '@sfh/download-token';
import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';
import type { AppConfig } from '../src/config.ts';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError, multipart, walkFiles } from './test-utils.ts';

const db = useTestDatabase();

interface FileView {
  id: string;
  name: string;
  size: number;
}

async function signedIn(app: FastifyInstance) {
  const client = new TestClient(app);
  const user = await client.register();
  return { client, user };
}

/** Object files in the store, `.tmp` left out. */
const storedObjects = (config: AppConfig) => walkFiles(config.storageDir, ['.tmp']);
/** Unfinished writes. */
const tempFiles = (config: AppConfig) => walkFiles(join(config.storageDir, '.tmp'));

/** Nothing but `expected` rows and as many objects, and no temp file. */
async function expectStored(app: FastifyInstance, config: AppConfig, userId: string, expected: number) {
  expect(await count(app, 'files WHERE user_id = $1', [userId])).toBe(expected);
  expect(await storedObjects(config)).toHaveLength(expected);
  expect(await tempFiles(config)).toEqual([]);
}

/**
 * An upload with the token fetched beforehand and passed explicitly, so that concurrent uploads
 * of one client do not each create the session's CSRF secret anew.
 */
function uploadWith(client: TestClient, token: string, name: string, content: string | Buffer) {
  const body = multipart([
    { name: 'file', filename: name, contentType: 'application/octet-stream', content },
  ]);
  return client.request({
    method: 'POST',
    url: '/api/files',
    payload: body.payload,
    headers: { ...body.headers, 'x-csrf-token': token },
  });
}

describe('per-user quota', () => {
  it('refuses an upload over USER_QUOTA_BYTES with 413 QUOTA_EXCEEDED and keeps nothing of it', async () => {
    const { app, config } = await buildTestApp(db(), { USER_QUOTA_BYTES: '1000' });
    const { client, user } = await signedIn(app);

    expect((await client.upload('a.bin', randomBytes(600))).statusCode).toBe(201);
    await expectStored(app, config, user.id, 1);

    expectError(await client.upload('b.bin', randomBytes(600)), 413, 'QUOTA_EXCEEDED');
    await expectStored(app, config, user.id, 1);

    // Exactly at the quota is fine.
    const fits = await client.upload('c.bin', randomBytes(400));
    expect(fits.statusCode).toBe(201);
    expect(fits.json().file.size).toBe(400);
    await expectStored(app, config, user.id, 2);

    expectError(await client.upload('d.bin', randomBytes(1)), 413, 'QUOTA_EXCEEDED');
    await expectStored(app, config, user.id, 2);

    // The quota is per user: someone else still has all of theirs.
    const other = await signedIn(app);
    expect((await other.client.upload('e.bin', randomBytes(1000))).statusCode).toBe(201);

    // Deleting frees the space again.
    const id = fits.json().file.id as string;
    expect((await client.request({ method: 'DELETE', url: `/api/files/${id}` })).statusCode).toBe(204);
    expect((await client.upload('f.bin', randomBytes(400))).statusCode).toBe(201);
  });

  it('says FILE_TOO_LARGE, not QUOTA_EXCEEDED, when the file is over MAX_UPLOAD_BYTES within the quota', async () => {
    const { app, config } = await buildTestApp(db(), { USER_QUOTA_BYTES: '10000', MAX_UPLOAD_BYTES: '500' });
    const { client, user } = await signedIn(app);
    expectError(await client.upload('big.bin', randomBytes(600)), 413, 'FILE_TOO_LARGE');
    await expectStored(app, config, user.id, 0);
  });

  it('holds against concurrent uploads: 5 × 300 bytes with a quota of 1000', async () => {
    const { app, config } = await buildTestApp(db(), { USER_QUOTA_BYTES: '1000' });
    const { client, user } = await signedIn(app);
    const token = await client.csrfToken();

    const responses = await Promise.all(
      Array.from({ length: 5 }, (_, i) => uploadWith(client, token, `c${i}.bin`, randomBytes(300))),
    );
    const created = responses.filter((r) => r.statusCode === 201).length;
    // Each upload reserves its body's size (300 bytes plus the multipart framing) while it runs:
    // two fit side by side for sure, a third only if others finished before it started; never
    // a fourth.
    expect(created).toBeGreaterThanOrEqual(2);
    expect(created).toBeLessThanOrEqual(3);
    for (const response of responses.filter((r) => r.statusCode !== 201)) {
      expectError(response, 413, 'QUOTA_EXCEEDED');
    }
    const { rows } = await app.db.query<{ total: string; n: number }>(
      'SELECT coalesce(sum(size), 0)::text AS total, count(*)::int AS n FROM files WHERE user_id = $1',
      [user.id],
    );
    expect(Number(rows[0]?.total)).toBeLessThanOrEqual(1000);
    expect(rows[0]?.n).toBe(created);
    await expectStored(app, config, user.id, created);
    expect(await count(app, 'upload_reservations')).toBe(0);
  });

  it('six uploads side by side never put more than the quota on disk', async () => {
    const { app, config } = await buildTestApp(db(), { USER_QUOTA_BYTES: '100000' });
    const { client } = await signedIn(app);
    const token = await client.csrfToken();
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const cookie = [...client.cookies].map(([name, value]) => `${name}=${value}`).join('; ');

    // Each sends 90 kB of a 100 kB file, then waits: all six are in flight at once.
    const body = multipart([{ name: 'file', filename: 'big.bin', content: randomBytes(100_000) }]);
    const cut = body.payload.length - 10_100;
    const uploads = Array.from({ length: 6 }, () => {
      const request = httpRequest({
        port,
        host: '127.0.0.1',
        method: 'POST',
        path: '/api/files',
        headers: { ...body.headers, 'content-length': body.payload.length, cookie, 'x-csrf-token': token },
      });
      const response = new Promise<number>((resolve, reject) => {
        request.on('response', (res) => {
          res.resume();
          resolve(res.statusCode as number);
        });
        request.on('error', reject);
      });
      request.write(body.payload.subarray(0, cut));
      return { request, response };
    });
    // Wait until the bytes have arrived (those that A accepts).
    await expect
      .poll(async () => {
        const sizes = await Promise.all(
          (await tempFiles(config)).map((name) =>
            stat(join(config.storageDir, '.tmp', name)).then((s) => s.size),
          ),
        );
        return sizes.reduce((a, b) => a + b, 0);
      })
      .toBeGreaterThanOrEqual(80_000);
    const onDisk = await Promise.all(
      (await tempFiles(config)).map((name) =>
        stat(join(config.storageDir, '.tmp', name)).then((s) => s.size),
      ),
    );
    expect(onDisk.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(100_000);

    for (const { request } of uploads) request.end(body.payload.subarray(cut));
    const statuses = (await Promise.all(uploads.map((u) => u.response.catch(() => 0)))).sort();
    // One fits; the others were refused at once (413) or cut off after the refusal (0).
    expect(statuses.filter((status) => status === 201)).toHaveLength(1);
    expect(statuses.filter((status) => status !== 201 && status !== 413 && status !== 0)).toEqual([]);
  });
});

describe('one file part per request', () => {
  it.each([
    [
      'two file parts named file',
      [
        { name: 'file', filename: 'a.txt', content: 'first' },
        { name: 'file', filename: 'b.txt', content: 'second' },
      ],
    ],
    [
      'a second file part under another name',
      [
        { name: 'file', filename: 'a.txt', content: 'first' },
        { name: 'other', filename: 'b.txt', content: 'second' },
      ],
    ],
  ])('refuses %s with 400 and stores nothing', async (_case, parts) => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const response = await client.request({ method: 'POST', url: '/api/files', ...multipart(parts) });
    expectError(response, 400, 'VALIDATION_FAILED');
    await expectStored(app, config, user.id, 0);
  });

  it('accepts a text field before the file (a form with _csrf)', async () => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const token = await client.csrfToken();
    const body = multipart([
      { name: '_csrf', content: token },
      { name: 'file', filename: 'form.txt', contentType: 'text/plain', content: 'from a form' },
    ]);
    const response = await client.request({
      method: 'POST',
      url: '/api/files',
      payload: body.payload,
      headers: { ...body.headers, 'x-csrf-token': token },
    });
    expect(response.statusCode).toBe(201);
    expect(response.json().file).toMatchObject({ name: 'form.txt', size: 'from a form'.length });
    await expectStored(app, config, user.id, 1);
  });
});

describe('file names', () => {
  it.each([
    ['a right-to-left override', 'evil\u202Egpj.exe', 'evilgpj.exe'],
    ['a control character', 'a\u0007b.txt', 'ab.txt'],
    ['directional isolates and marks', '\u2067x\u2069\u200Fy\u061C.txt', 'xy.txt'],
  ])('keeps a name with %s exactly as given; displayFileName strips it', async (_case, name, shown) => {
    const { app, config } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const response = await client.upload(name, 'content');
    expect(response.statusCode).toBe(201);
    const { file } = response.json<{ file: FileView }>();
    expect(file.name).toBe(name);

    const list = await client.request({ method: 'GET', url: '/api/files' });
    expect(list.json<{ files: FileView[] }>().files.map((f) => f.name)).toEqual([name]);
    const get = await client.request({ method: 'GET', url: `/api/files/${file.id}` });
    expect(get.json<{ file: FileView }>().file.name).toBe(name);

    expect(displayFileName(file.name)).toBe(shown);
    // Never part of a path: the object is stored under a generated id.
    const objects = await storedObjects(config);
    expect(objects).toHaveLength(1);
    expect(objects[0]).toMatch(/^[A-Za-z0-9_-]{2}[/\\][A-Za-z0-9_-]{21}$/);
  });

  it("refuses a name with NUL (filename*=UTF-8''a%00b.txt: Postgres cannot store it) with 400", async () => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const body = Buffer.from(
      `--b\r\nContent-Disposition: form-data; name="file"; filename*=UTF-8''a%00b.txt\r\n\r\ncontent\r\n--b--\r\n`,
    );
    const response = await client.request({
      method: 'POST',
      url: '/api/files',
      payload: body,
      headers: { 'content-type': 'multipart/form-data; boundary=b' },
    });
    expectError(response, 400, 'VALIDATION_FAILED');
    await expectStored(app, config, user.id, 0);
  });

  it('keeps names with slashes as given, never as a path', async () => {
    // Names are metadata: nothing in them needs stripping for storage's sake.
    const { app, config } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const names = ['../../etc/passwd', 'reports/2026/q1.pdf'];
    for (const name of names) {
      const response = await client.upload(name, name);
      expect(response.statusCode).toBe(201);
      expect(response.json<{ file: FileView }>().file.name).toBe(name);
    }
    const list = await client.request({ method: 'GET', url: '/api/files' });
    expect(
      list
        .json<{ files: FileView[] }>()
        .files.map((f) => f.name)
        .sort(),
    ).toEqual([...names].sort());
    const objects = await storedObjects(config);
    expect(objects).toHaveLength(names.length);
    for (const object of objects) expect(object).toMatch(/^[A-Za-z0-9_-]{2}[/\\][A-Za-z0-9_-]{21}$/);
  });

  it('accepts 255 characters and refuses 256 with 400, storing nothing', async () => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    expectError(await client.upload(`${'n'.repeat(252)}.txt`, 'x'), 400, 'VALIDATION_FAILED');
    await expectStored(app, config, user.id, 0);
    const fits = await client.upload(`${'n'.repeat(251)}.txt`, 'x');
    expect(fits.statusCode).toBe(201);
    expect(fits.json().file.name).toHaveLength(255);
  });

  it('keeps both of two concurrent uploads with the same name', async () => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const token = await client.csrfToken();
    const [a, b] = await Promise.all([
      uploadWith(client, token, 'same.txt', 'first'),
      uploadWith(client, token, 'same.txt', 'second'),
    ]);
    expect(a?.statusCode).toBe(201);
    expect(b?.statusCode).toBe(201);
    const ids = [a?.json().file.id, b?.json().file.id];
    expect(ids[0]).not.toBe(ids[1]);
    const list = await client.request({ method: 'GET', url: '/api/files' });
    const files = list.json<{ files: (FileView & { sha256: string })[] }>().files;
    expect(files.map((f) => f.id).sort()).toEqual([...ids].sort());
    expect(files.map((f) => f.name)).toEqual(['same.txt', 'same.txt']);
    expect(new Set(files.map((f) => f.sha256)).size).toBe(2);
    await expectStored(app, config, user.id, 2);
  });
});

describe('aborted uploads', () => {
  it('leave no temp file and no row when the client goes away mid-upload', async () => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const token = await client.csrfToken();
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;

    const boundary = '----sfhabort';
    const head = Buffer.from(
      `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n`,
    );
    const content = randomBytes(4 * 1024 * 1024);
    const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
    const request = httpRequest({
      host: '127.0.0.1',
      port,
      method: 'POST',
      path: '/api/files',
      headers: {
        'content-type': `multipart/form-data; boundary=${boundary}`,
        'content-length': head.length + content.length + tail.length,
        cookie: `sid=${client.cookies.get('sid')}`,
        'x-csrf-token': token,
      },
    });
    const ended = new Promise<void>((resolve) => {
      request.on('error', () => resolve());
      request.on('close', () => resolve());
    });
    request.write(head);
    request.write(content.subarray(0, content.length / 2));

    // The server is writing the file when the client goes away.
    for (let i = 0; i < 200 && (await tempFiles(config)).length === 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    expect(await tempFiles(config)).toHaveLength(1);
    request.destroy();
    await ended;

    let left: string[] = [];
    for (let i = 0; i < 40; i++) {
      left = [...(await tempFiles(config)), ...(await storedObjects(config))];
      if (left.length === 0) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    expect(left).toEqual([]);
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);

    // And the server carries on.
    const after = await client.upload('after.txt', 'still fine');
    expect(after.statusCode).toBe(201);
  });
});
