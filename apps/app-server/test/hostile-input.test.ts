import fc from 'fast-check';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { multipart } from './test-utils.ts';

// Every string a client controls, on every route, gets hostile values: NUL and other control
// characters, lone surrogates, bidi controls, characters that case-fold oddly, percent escapes,
// very long runs. Whatever the value, A answers with a 4xx (or a success), never a 5xx: input
// is validated before it reaches Postgres, and the session store's failures are catalogued.

const db = useTestDatabase();

const SPECIAL = [
  '\u0000',
  '\u0001',
  '\u001b[31m',
  '\u007f',
  '\u0085',
  '\u009b',
  '\ud800',
  '\udfff',
  '\ud83d\ude00',
  '\u202e',
  '\u2028',
  '\ufeff',
  '\uffff',
  'İ',
  'ı',
  'ß',
  'K',
  '%00',
  '%',
  '\\u0000',
  '"',
  "'",
  '<script>',
  '../',
  '//',
  '\r\n',
  '\t',
  ' ',
];

/** A hostile string: pieces of SPECIAL among arbitrary code points (lone surrogates included). */
const hostile = fc
  .array(
    fc.oneof(
      fc.constantFrom(...SPECIAL),
      fc.string({ unit: 'binary', maxLength: 8 }),
      fc.string({
        unit: fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)),
        maxLength: 8,
      }),
      fc.constantFrom('alice', 'correct horse battery'),
    ),
    { maxLength: 12 },
  )
  .map((pieces) => pieces.join(''));

/** `application/x-www-form-urlencoded`, every byte percent-encoded (what a browser can send). */
const formBody = (fields: Record<string, string>) =>
  Object.entries(fields)
    .map(([name, value]) => {
      const bytes = [...Buffer.from(value, 'utf8')].map((b) => `%${b.toString(16).padStart(2, '0')}`);
      return `${name}=${bytes.join('')}`;
    })
    .join('&');

/** A path segment as a client can send it: percent-encoded UTF-8 bytes. */
const segment = (value: string) =>
  [...Buffer.from(value, 'utf8')].map((b) => `%${b.toString(16).padStart(2, '0')}`).join('') || '%00';

/** Header values a real HTTP parser lets through: visible ASCII, tab and obs-text. */
const headerValue = fc.string({
  unit: fc
    .oneof(fc.integer({ min: 0x20, max: 0x7e }), fc.constant(0x09), fc.integer({ min: 0x80, max: 0xff }))
    .map((c) => String.fromCharCode(c)),
  maxLength: 300,
});

function expectNo5xx(response: LightMyRequestResponse, what: string) {
  if (response.statusCode >= 500) throw new Error(`${what}: ${response.statusCode} ${response.body}`);
  // Never a raw Postgres error for a client to read.
  expect(response.body).not.toMatch(/22P05|22021|unsupported Unicode|invalid byte sequence/);
}

const RUNS = { numRuns: 40 };

describe('hostile strings in every string field get 4xx, never 5xx', () => {
  let app: FastifyInstance;
  let client: TestClient;
  let fileId: string;
  const unthrottled = {
    LOGIN_MAX_FAILURES_PER_ACCOUNT: '100000',
    LOGIN_MAX_FAILURES_PER_IP: '100000',
    REGISTRATIONS_PER_IP_PER_HOUR: '0',
  };

  it('JSON sign-up, sign-in and password change', async () => {
    ({ app } = await buildTestApp(db(), unthrottled));
    client = new TestClient(app);
    await client.register();
    await fc.assert(
      fc.asyncProperty(hostile, hostile, headerValue, async (username, password, userAgent) => {
        const anonymous = new TestClient(app);
        for (const url of ['/api/auth/register', '/api/auth/login']) {
          expectNo5xx(
            await anonymous.request({
              method: 'POST',
              url,
              payload: JSON.stringify({ username, password }),
              headers: { 'content-type': 'application/json', 'user-agent': userAgent },
            }),
            url,
          );
        }
        // The CSRF token and the cookie are client strings too.
        expectNo5xx(
          await app.inject({
            method: 'POST',
            url: '/api/auth/logout',
            headers: { 'x-csrf-token': userAgent, cookie: `sid=${userAgent.replace(/[;\s]/g, '')}` },
          }),
          'logout with hostile token and cookie',
        );
        expectNo5xx(
          await client.request({
            method: 'POST',
            url: '/api/auth/password',
            payload: JSON.stringify({ currentPassword: username, newPassword: password }),
            headers: { 'content-type': 'application/json' },
          }),
          'password',
        );
      }),
      RUNS,
    );
  });

  it('HTML forms: sign-in, sign-up, password, and the next parameter', async () => {
    ({ app } = await buildTestApp(db(), unthrottled));
    const signedIn = new TestClient(app);
    await signedIn.register();
    await fc.assert(
      fc.asyncProperty(
        hostile,
        hostile,
        hostile,
        headerValue,
        async (username, password, next, userAgent) => {
          const browser = new TestClient(app);
          const token = await browser.csrfToken();
          for (const url of ['/login', '/register']) {
            expectNo5xx(
              await browser.request({
                method: 'POST',
                url,
                payload: formBody({ username, password, next, _csrf: token }),
                headers: { 'content-type': 'application/x-www-form-urlencoded', 'user-agent': userAgent },
              }),
              url,
            );
          }
          expectNo5xx(
            await browser.request({ method: 'GET', url: `/login?next=${segment(next)}` }),
            'GET /login',
          );
          expectNo5xx(await signedIn.request({ method: 'GET', url: `/?sort=${segment(next)}` }), 'GET /');
          expectNo5xx(
            await signedIn.request({
              method: 'POST',
              url: '/password',
              payload: formBody({
                currentPassword: username,
                newPassword: password,
                confirmPassword: password,
                _csrf: await signedIn.csrfToken(),
              }),
              headers: { 'content-type': 'application/x-www-form-urlencoded' },
            }),
            'POST /password',
          );
        },
      ),
      RUNS,
    );
  });

  it('upload file names (filename and filename*) and content types', async () => {
    ({ app } = await buildTestApp(db()));
    const uploader = new TestClient(app);
    await uploader.register();
    const token = await uploader.csrfToken();
    await fc.assert(
      fc.asyncProperty(hostile, hostile, async (name, type) => {
        // filename*: RFC 8187, any bytes; filename: what fits between quotes on one line.
        const quoted = name.replace(/["\r\n\\]/g, '_');
        for (const disposition of [
          `form-data; name="file"; filename*=UTF-8''${segment(name)}`,
          `form-data; name="file"; filename="${quoted}"`,
        ]) {
          const boundary = 'hostileboundary';
          const body = Buffer.concat([
            Buffer.from(`--${boundary}\r\nContent-Disposition: `),
            Buffer.from(disposition, 'utf8'),
            Buffer.from(
              `\r\nContent-Type: ${type.replace(/[\r\n]/g, '_')}\r\n\r\nbytes\r\n--${boundary}--\r\n`,
            ),
          ]);
          expectNo5xx(
            await uploader.request({
              method: 'POST',
              url: '/api/files',
              payload: body,
              headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'x-csrf-token': token },
            }),
            disposition,
          );
        }
      }),
      RUNS,
    );
    const ok = multipart([{ name: 'file', filename: 'ok.txt', content: 'ok' }]);
    const created = await uploader.request({
      method: 'POST',
      url: '/api/files',
      payload: ok.payload,
      headers: { ...ok.headers, 'x-csrf-token': token },
    });
    expect(created.statusCode).toBe(201);
    fileId = created.json<{ file: { id: string } }>().file.id;
    expect(fileId).toBeTruthy();

    // Ids in paths, for files and sessions.
    await fc.assert(
      fc.asyncProperty(hostile, async (id) => {
        const s = segment(id);
        for (const [method, url] of [
          ['GET', `/api/files/${s}`],
          ['DELETE', `/api/files/${s}`],
          ['POST', `/api/files/${s}/download-token`],
          ['GET', `/files/${s}/download`],
          ['DELETE', `/api/sessions/${s}`],
        ] as const) {
          expectNo5xx(await uploader.request({ method, url }), `${method} ${url}`);
        }
        for (const url of [`/files/${s}/delete`, `/sessions/${s}/end`]) {
          expectNo5xx(
            await uploader.request({
              method: 'POST',
              url,
              payload: formBody({ _csrf: token }),
              headers: { 'content-type': 'application/x-www-form-urlencoded' },
            }),
            url,
          );
        }
      }),
      RUNS,
    );
  });

  it('share links: ids, passwords and form fields of the owner and the public routes', async () => {
    ({ app } = await buildTestApp(db(), unthrottled));
    const sharer = new TestClient(app);
    await sharer.register();
    const token = await sharer.csrfToken();
    const upload = await sharer.upload('shared.txt', 'bytes');
    const file = upload.json<{ file: { id: string } }>().file;
    const made = await sharer.request({
      method: 'POST',
      url: `/api/files/${file.id}/shares`,
      payload: { password: 'open sesame!' },
    });
    expect(made.statusCode).toBe(201);
    const shareId = made.json<{ share: { id: string } }>().share.id;
    await fc.assert(
      fc.asyncProperty(hostile, hostile, async (id, password) => {
        const s = segment(id);
        for (const [method, url] of [
          ['GET', `/s/${s}`],
          ['POST', `/s/${s}/download`],
          ['POST', `/api/shares/${s}/download-token`],
          ['DELETE', `/api/shares/${s}`],
          ['POST', `/api/files/${s}/shares`],
          ['POST', `/files/${s}/shares`],
          ['POST', `/shares/${s}/revoke`],
        ] as const) {
          expectNo5xx(await sharer.request({ method, url }), `${method} ${url}`);
        }
        expectNo5xx(
          await app.inject({
            method: 'POST',
            url: `/api/shares/${shareId}/download-token`,
            payload: JSON.stringify({ password }),
            headers: { 'content-type': 'application/json' },
          }),
          'share password (JSON)',
        );
        expectNo5xx(
          await app.inject({
            method: 'POST',
            url: `/s/${shareId}/download`,
            payload: formBody({ password }),
            headers: { 'content-type': 'application/x-www-form-urlencoded' },
          }),
          'share password (form)',
        );
        expectNo5xx(
          await sharer.request({
            method: 'POST',
            url: `/api/files/${file.id}/shares`,
            payload: JSON.stringify({ password, expiresInSeconds: id, maxDownloads: password }),
            headers: { 'content-type': 'application/json' },
          }),
          'new share (JSON)',
        );
        for (const url of [`/files/${file.id}/shares`, `/files/${s}/shares`, `/shares/${s}/revoke`]) {
          expectNo5xx(
            await sharer.request({
              method: 'POST',
              url,
              payload: formBody({ _csrf: token, expiresInSeconds: id, maxDownloads: id, password }),
              headers: { 'content-type': 'application/x-www-form-urlencoded' },
            }),
            url,
          );
        }
      }),
      RUNS,
    );
  });

  it('a session the store cannot save is a catalogued 500, never the database error', async () => {
    ({ app } = await buildTestApp(db()));
    // Postgres refusing the session row (as it refused NUL and lone surrogates before they were
    // cleaned): the save fails in onSend, after the route's answer was decided.
    await app.db.query(
      `ALTER TABLE sessions ADD CONSTRAINT refuse_boom CHECK (data->>'userAgent' IS DISTINCT FROM 'boom') NOT VALID`,
    );
    try {
      const response = await new TestClient(app).request({
        method: 'POST',
        url: '/api/auth/register',
        payload: { username: 'boomer', password: 'correct horse battery' },
        headers: { 'user-agent': 'boom' },
      });
      expect({ status: response.statusCode, body: response.json() }).toEqual({
        status: 500,
        body: { error: 'INTERNAL', message: 'Internal server error' },
      });
    } finally {
      await app.db.query('ALTER TABLE sessions DROP CONSTRAINT refuse_boom');
    }
  });
});
