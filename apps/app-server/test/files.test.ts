import { createHash, randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TOKEN_ALGORITHM } from '@sfh/download-token';
import type { FastifyInstance } from 'fastify';
import { decodeProtectedHeader, type JWK } from 'jose';
import { describe, expect, it } from 'vitest';
import type { AppConfig } from '../src/config.ts';
import { buildTestApp, claimsOf, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError, multipart, setCookies, walkFiles } from './test-utils.ts';

const db = useTestDatabase();

interface FileView {
  id: string;
  name: string;
  size: number;
  contentType: string;
  sha256: string;
  createdAt: string;
}

const sha256 = (content: string | Buffer) => createHash('sha256').update(content).digest('hex');

async function signedIn(app: FastifyInstance) {
  const client = new TestClient(app);
  const user = await client.register();
  return { client, user };
}

async function uploaded(client: TestClient, name = 'hello.txt', content: string | Buffer = 'hello') {
  const response = await client.upload(name, content, 'text/plain');
  expect(response.statusCode).toBe(201);
  return response.json<{ file: FileView }>().file;
}

/** Object files in the store (the `.tmp` folder of unfinished writes left out). */
const storedObjects = (config: AppConfig) => walkFiles(config.storageDir, ['.tmp']);

describe('upload', () => {
  it('stores the bytes and describes them', async () => {
    const { app, config } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const content = randomBytes(70_000);
    const response = await client.upload('data.bin', content, 'application/x-custom');
    expect(response.statusCode).toBe(201);
    const { file } = response.json<{ file: FileView }>();
    expect(file).toEqual({
      id: expect.any(String),
      name: 'data.bin',
      size: content.length,
      contentType: 'application/x-custom',
      sha256: sha256(content),
      createdAt: expect.any(String),
    });
    expect(new Date(file.createdAt).toISOString()).toBe(file.createdAt);

    const objects = await storedObjects(config);
    expect(objects).toHaveLength(1);
    expect(await readFile(join(config.storageDir, objects[0] as string))).toEqual(content);

    const get = await client.request({ method: 'GET', url: `/api/files/${file.id}` });
    expect(get.statusCode).toBe(200);
    expect(get.json()).toEqual({ file });
  });

  it('stores an empty file', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const file = await uploaded(client, 'empty.txt', '');
    expect(file.size).toBe(0);
    expect(file.sha256).toBe(sha256(''));
  });

  it('keeps a non-ASCII name', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const name = 'résumé 2026.pdf';
    const file = await uploaded(client, name, '%PDF-1.7');
    expect(file.name).toBe(name);
    const list = await client.request({ method: 'GET', url: '/api/files' });
    expect(list.json().files[0].name).toBe(name);
    const get = await client.request({ method: 'GET', url: `/api/files/${file.id}` });
    expect(get.json().file.name).toBe(name);
  });

  it.each([
    ['text/plain', 'text/plain'],
    ['Text/Plain', 'text/plain'],
    ['image/svg+xml', 'image/svg+xml'],
    ['garbage', 'application/octet-stream'],
    ['a/b/c', 'application/octet-stream'],
    ['text/ plain', 'application/octet-stream'],
    ['/', 'application/octet-stream'],
  ])('records content type %j as %j', async (sent, recorded) => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const response = await client.upload('x.bin', 'x', sent);
    expect(response.statusCode).toBe(201);
    expect(response.json().file.contentType).toBe(recorded);
  });

  it('refuses a file over MAX_UPLOAD_BYTES and leaves nothing behind', async () => {
    const { app, config } = await buildTestApp(db(), { MAX_UPLOAD_BYTES: '1000' });
    const { client, user } = await signedIn(app);

    const response = await client.upload('big.bin', randomBytes(5000));
    expectError(response, 413, 'FILE_TOO_LARGE');
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
    expect(await walkFiles(config.storageDir)).toEqual([]);

    const justOver = await client.upload('big.bin', randomBytes(1001));
    expectError(justOver, 413, 'FILE_TOO_LARGE');
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
    expect(await walkFiles(config.storageDir)).toEqual([]);

    // Exactly the limit is fine, and the app is still healthy.
    const atLimit = await client.upload('fits.bin', randomBytes(1000));
    expect(atLimit.statusCode).toBe(201);
    expect(atLimit.json().file.size).toBe(1000);
    expect(await storedObjects(config)).toHaveLength(1);
  });

  it.each([
    ['no parts', []],
    ['only a text field', [{ name: 'file', content: 'not a file' }]],
    ['a file under another field name', [{ name: 'upload', filename: 'a.txt', content: 'hello' }]],
  ])('refuses a body with %s', async (_case, parts) => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const response = await client.request({ method: 'POST', url: '/api/files', ...multipart(parts) });
    expectError(response, 400, 'VALIDATION_FAILED');
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
    expect(await walkFiles(config.storageDir)).toEqual([]);
  });

  it('refuses a JSON or text body with a 4xx', async () => {
    const { app, config } = await buildTestApp(db());
    const { client } = await signedIn(app);
    for (const request of [
      { payload: { file: 'hello' } },
      { payload: 'hello', headers: { 'content-type': 'text/plain' } },
    ]) {
      const response = await client.request({ method: 'POST', url: '/api/files', ...request });
      expect(response.statusCode).toBeGreaterThanOrEqual(400);
      expect(response.statusCode).toBeLessThan(500);
      expect(response.json()).toMatchObject({ error: 'VALIDATION_FAILED', message: expect.any(String) });
    }
    expect(await walkFiles(config.storageDir)).toEqual([]);
  });

  it.each([
    ['without a boundary', 'multipart/form-data', 'garbage'],
    ['not matching its boundary', 'multipart/form-data; boundary=x', 'garbage'],
    [
      'cut off inside the file part',
      'multipart/form-data; boundary=x',
      '--x\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhalf a fi',
    ],
  ])('answers a malformed multipart body %s with 400, not 500', async (_case, contentType, payload) => {
    const { app, config } = await buildTestApp(db());
    const { client, user } = await signedIn(app);
    const response = await client.request({
      method: 'POST',
      url: '/api/files',
      payload,
      headers: { 'content-type': contentType },
    });
    expectError(response, 400, 'VALIDATION_FAILED');
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
    expect(await walkFiles(config.storageDir)).toEqual([]);
  });

  it('refuses anonymous uploads and lists', async () => {
    const { app, config } = await buildTestApp(db());
    const client = new TestClient(app);
    expectError(await client.upload('a.txt', 'hello'), 401, 'UNAUTHENTICATED');
    expectError(await client.request({ method: 'GET', url: '/api/files' }), 401, 'UNAUTHENTICATED');
    expect(await walkFiles(config.storageDir)).toEqual([]);
  });
});

describe('own files only', () => {
  it("lists one's own files", async () => {
    const { app } = await buildTestApp(db());
    const alice = await signedIn(app);
    const bob = await signedIn(app);
    const a1 = await uploaded(alice.client, 'a1.txt', 'a1');
    const a2 = await uploaded(alice.client, 'a2.txt', 'a2');
    const b1 = await uploaded(bob.client, 'b1.txt', 'b1');

    const aliceList = await alice.client.request({ method: 'GET', url: '/api/files' });
    expect(aliceList.statusCode).toBe(200);
    expect(
      aliceList
        .json<{ files: FileView[] }>()
        .files.map((f) => f.id)
        .sort(),
    ).toEqual([a1.id, a2.id].sort());
    const bobList = await bob.client.request({ method: 'GET', url: '/api/files' });
    expect(bobList.json()).toEqual({ files: [b1] });

    const newcomer = await signedIn(app);
    expect((await newcomer.client.request({ method: 'GET', url: '/api/files' })).json()).toEqual({
      files: [],
    });
  });

  it("answers 404 for another user's file", async () => {
    const { app, config } = await buildTestApp(db());
    const alice = await signedIn(app);
    const bob = await signedIn(app);
    const file = await uploaded(alice.client);

    for (const request of [
      { method: 'GET', url: `/api/files/${file.id}` },
      { method: 'DELETE', url: `/api/files/${file.id}` },
      { method: 'POST', url: `/api/files/${file.id}/download-token` },
      { method: 'GET', url: `/files/${file.id}/download` },
    ] as const) {
      expectError(await bob.client.request(request), 404, 'NOT_FOUND');
    }
    // Still there for its owner, bytes included.
    const get = await alice.client.request({ method: 'GET', url: `/api/files/${file.id}` });
    expect(get.statusCode).toBe(200);
    expect(await storedObjects(config)).toHaveLength(1);
  });

  it('answers 404 for a file that does not exist', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    for (const request of [
      { method: 'GET', url: '/api/files/doesNotExist' },
      { method: 'DELETE', url: '/api/files/doesNotExist' },
      { method: 'POST', url: '/api/files/doesNotExist/download-token' },
      { method: 'GET', url: '/files/doesNotExist/download' },
    ] as const) {
      expectError(await client.request(request), 404, 'NOT_FOUND');
    }
  });

  it('answers a malformed id with 400 or 404, never 500', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    for (const id of ['x'.repeat(65), 'a%20b', '%2e%2e', '..%2F..%2Fetc', 'a$b', '%00', "a'b", 'é']) {
      for (const request of [
        { method: 'GET', url: `/api/files/${id}` },
        { method: 'DELETE', url: `/api/files/${id}` },
        { method: 'POST', url: `/api/files/${id}/download-token` },
        { method: 'GET', url: `/files/${id}/download` },
      ] as const) {
        const response = await client.request(request);
        expect([400, 404], `${request.method} ${request.url}`).toContain(response.statusCode);
        expect(['VALIDATION_FAILED', 'NOT_FOUND']).toContain(response.json().error);
      }
    }
  });
});

describe('delete', () => {
  it('removes the row and the bytes', async () => {
    const { app, config } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const keep = await uploaded(client, 'keep.txt', 'keep');
    const file = await uploaded(client, 'gone.txt', 'gone');
    expect(await storedObjects(config)).toHaveLength(2);

    const response = await client.request({ method: 'DELETE', url: `/api/files/${file.id}` });
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');

    const list = await client.request({ method: 'GET', url: '/api/files' });
    expect(list.json()).toEqual({ files: [keep] });
    expectError(await client.request({ method: 'GET', url: `/api/files/${file.id}` }), 404, 'NOT_FOUND');
    expectError(await client.request({ method: 'DELETE', url: `/api/files/${file.id}` }), 404, 'NOT_FOUND');
    const objects = await storedObjects(config);
    expect(objects).toHaveLength(1);
    expect(await readFile(join(config.storageDir, objects[0] as string), 'utf8')).toBe('keep');

    await client.request({ method: 'DELETE', url: `/api/files/${keep.id}` });
    expect(await storedObjects(config)).toEqual([]);
  });
});

describe('download tokens', () => {
  async function jwks(app: FastifyInstance) {
    const response = await app.inject({ method: 'GET', url: '/.well-known/jwks.json' });
    expect(response.statusCode).toBe(200);
    return { response, keys: response.json<{ keys: JWK[] }>().keys };
  }

  it('mints a token B accepts, for this file and user', async () => {
    const { app } = await buildTestApp(db(), { TOKEN_TTL_SECONDS: '120' });
    const { client, user } = await signedIn(app);
    const content = randomBytes(1234);
    const name = 'résumé 2026.pdf';
    const upload = await client.upload(name, content, 'application/pdf');
    const { file } = upload.json<{ file: FileView }>();

    const mintedAt = Date.now();
    const response = await client.request({ method: 'POST', url: `/api/files/${file.id}/download-token` });
    expect(response.statusCode).toBe(201);
    const body = response.json<{ url: string; token: string; expiresAt: string }>();
    expect(Object.keys(body).sort()).toEqual(['expiresAt', 'token', 'url']);
    expect(body.url.startsWith(`http://b.test/d/${body.token}`)).toBe(true);
    expect(new Date(body.expiresAt).toISOString()).toBe(body.expiresAt);
    expect(Math.abs(Date.parse(body.expiresAt) - (mintedAt + 120_000))).toBeLessThan(5_000);

    const header = decodeProtectedHeader(body.token);
    expect(header).toMatchObject({ typ: 'dl+jwt', alg: TOKEN_ALGORITHM, kid: expect.any(String) });
    const { keys } = await jwks(app);
    expect(keys.map((key) => key.kid)).toContain(header.kid);

    const claims = await claimsOf(app, body.token);
    expect(claims).toMatchObject({
      iss: 'http://a.test',
      aud: 'http://b.test',
      sub: user.id,
      fid: file.id,
      name,
      ctype: 'application/pdf',
      size: content.length,
      sha256: sha256(content),
    });
    const { rows } = await app.db.query<{ object_id: string }>('SELECT object_id FROM files WHERE id = $1', [
      file.id,
    ]);
    expect(claims.obj).toBe(rows[0]?.object_id);
    expect(claims.exp).toBe(Date.parse(body.expiresAt) / 1000);
    expect(claims.exp - claims.iat).toBe(120);
    expect(claims.jti.length).toBeGreaterThanOrEqual(21);
  });

  it('gives every token its own jti', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const file = await uploaded(client);
    const jtis = new Set<string>();
    for (let i = 0; i < 5; i++) {
      const response = await client.request({ method: 'POST', url: `/api/files/${file.id}/download-token` });
      expect(response.statusCode).toBe(201);
      const { token } = response.json<{ token: string }>();
      const payload = JSON.parse(Buffer.from(token.split('.')[1] as string, 'base64url').toString('utf8'));
      jtis.add(payload.jti);
    }
    expect(jtis.size).toBe(5);
  });

  it('refuses anonymous mints', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const file = await uploaded(client);
    const anonymous = new TestClient(app);
    expectError(
      await anonymous.request({ method: 'POST', url: `/api/files/${file.id}/download-token` }),
      401,
      'UNAUTHENTICATED',
    );
    expectError(
      await anonymous.request({ method: 'GET', url: `/api/files/${file.id}` }),
      401,
      'UNAUTHENTICATED',
    );
  });

  it('publishes public keys only, cacheable no longer than JWKS_REFRESH_SECONDS', async () => {
    const { app } = await buildTestApp(db(), { JWKS_REFRESH_SECONDS: '30' });
    const { response, keys } = await jwks(app);
    expect(keys.length).toBeGreaterThan(0);
    for (const key of keys) {
      expect(key).not.toHaveProperty('d');
      expect(key).toMatchObject({
        kty: 'EC',
        crv: 'P-256',
        kid: expect.any(String),
        x: expect.any(String),
        y: expect.any(String),
      });
      for (const privateMember of ['p', 'q', 'dp', 'dq', 'qi', 'k'])
        expect(key).not.toHaveProperty(privateMember);
    }
    const cacheControl = String(response.headers['cache-control']);
    const maxAge = /max-age=(\d+)/.exec(cacheControl);
    expect(maxAge, cacheControl).not.toBeNull();
    expect(Number(maxAge?.[1])).toBeLessThanOrEqual(30);
    expect(setCookies(response)).toEqual([]);
  });

  it('redirects /files/:id/download to a fresh B URL every time', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const file = await uploaded(client);
    const tokens: string[] = [];
    for (let i = 0; i < 2; i++) {
      const response = await client.request({ method: 'GET', url: `/files/${file.id}/download` });
      expect(response.statusCode).toBe(303);
      const location = String(response.headers.location);
      expect(location.startsWith('http://b.test/d/')).toBe(true);
      tokens.push(location.slice('http://b.test/d/'.length).split('/')[0] as string);
    }
    expect(tokens[0]).not.toBe(tokens[1]);
    expect(tokens.every((token) => token.split('.').length === 3)).toBe(true);
  });

  it('answers a signed-out /files/:id/download with 401', async () => {
    const { app } = await buildTestApp(db());
    const { client } = await signedIn(app);
    const file = await uploaded(client);
    const response = await new TestClient(app).request({
      method: 'GET',
      url: `/files/${file.id}/download`,
      headers: { accept: 'application/json' },
    });
    expectError(response, 401, 'UNAUTHENTICATED');
  });
});

describe('health', () => {
  it('is live and ready', async () => {
    const { app } = await buildTestApp(db());
    const healthz = await app.inject({ method: 'GET', url: '/healthz' });
    expect(healthz.statusCode).toBe(200);
    const readyz = await app.inject({ method: 'GET', url: '/readyz' });
    expect(readyz.statusCode).toBe(200);
  });
});
