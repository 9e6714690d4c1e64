import { type ClientRequest, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { username } from './test-utils.ts';

// A's log: one line per request, the refusal's code in it, and nothing a client can cause at
// error level.

const db = useTestDatabase();
const PASSWORD = 'correct horse battery';

type Line = {
  level: number;
  msg: string;
  reqId?: string;
  code?: string;
  err?: { stack?: string };
  res?: { statusCode: number };
  req?: { method: string; url: string };
};

/** A on the test database, logging at info into `lines`. */
async function loggedApp(env: Record<string, string> = {}) {
  const lines: Line[] = [];
  const logStream = { write: (line: string) => void lines.push(JSON.parse(line) as Line) };
  const { app } = await buildTestApp(db(), { LOG_LEVEL: 'info', ...env }, { logStream });
  /** The lines of each request, by request id. */
  const byRequest = () => {
    const groups = new Map<string, Line[]>();
    for (const line of lines)
      if (line.reqId) groups.set(line.reqId, [...(groups.get(line.reqId) ?? []), line]);
    return [...groups.values()];
  };
  return { app, lines, byRequest };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(check: () => boolean, ms = 5_000) {
  const deadline = Date.now() + ms;
  while (!check() && Date.now() < deadline) await sleep(20);
}

/** Sends the head and the first `sent` bytes of a `length`-byte body, then goes away. */
async function abandon(
  port: number,
  path: string,
  headers: Record<string, string>,
  first: string,
  length: number,
) {
  const req: ClientRequest = request({
    host: '127.0.0.1',
    port,
    path,
    method: 'POST',
    agent: false,
    headers: { ...headers, 'content-length': String(length) },
  });
  req.on('error', () => {});
  req.write(first);
  req.write(Buffer.alloc(64 * 1024, 'x'));
  await sleep(200);
  req.destroy();
}

describe('a client that goes away mid-request', () => {
  it('is one line at info, with no stack, for an upload, a form upload and a JSON body', async () => {
    const { app, lines, byRequest } = await loggedApp();
    const client = new TestClient(app);
    await client.register(username(), PASSWORD);
    const csrf = await client.csrfToken();
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as AddressInfo).port;
    const cookie = [...client.cookies].map(([name, value]) => `${name}=${value}`).join('; ');
    const boundary = 'sfh-abandoned';
    const part = `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\nContent-Type: application/octet-stream\r\n\r\n`;
    const multipart = { cookie, 'content-type': `multipart/form-data; boundary=${boundary}` };
    const before = lines.length;

    await abandon(port, '/api/files', { ...multipart, 'x-csrf-token': csrf }, part, 1_000_000);
    await abandon(port, `/upload?_csrf=${encodeURIComponent(csrf)}`, multipart, part, 1_000_000);
    await abandon(
      port,
      '/api/auth/login',
      { cookie, 'x-csrf-token': csrf, 'content-type': 'application/json' },
      '{"username":"',
      1_000_000,
    );
    await waitFor(() => lines.filter((line) => line.code === 'CLIENT_GONE').length === 3);
    await sleep(300);

    const written = lines.slice(before);
    // (In the order A noticed them.)
    const byUrl = (a: Line, b: Line) => String(a.req?.url).localeCompare(String(b.req?.url));
    expect(written.sort(byUrl).map((line) => [line.level, line.msg, line.code, line.req?.url])).toEqual([
      [30, 'client went away', 'CLIENT_GONE', '/api/auth/login'],
      [30, 'client went away', 'CLIENT_GONE', '/api/files'],
      [30, 'client went away', 'CLIENT_GONE', '/upload'],
    ]);
    expect(written.filter((line) => line.err !== undefined)).toEqual([]);
    expect(JSON.stringify(written)).not.toContain('stack');
    expect(byRequest().every((group) => group.length === 1)).toBe(true);
    // A is fine, and the user's session is untouched.
    expect((await client.request({ method: 'GET', url: '/api/files' })).json()).toEqual({ files: [] });
  });

  it('is one line at info too when A cuts off an upload past UPLOAD_TIMEOUT_SECONDS', async () => {
    const { app, lines } = await loggedApp({ UPLOAD_TIMEOUT_SECONDS: '1' });
    const client = new TestClient(app);
    await client.register(username(), PASSWORD);
    const csrf = await client.csrfToken();
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as AddressInfo).port;
    const boundary = 'sfh-trickled';
    const req = request({
      host: '127.0.0.1',
      port,
      path: '/api/files',
      method: 'POST',
      agent: false,
      headers: {
        cookie: [...client.cookies].map(([name, value]) => `${name}=${value}`).join('; '),
        'x-csrf-token': csrf,
        'content-type': `multipart/form-data; boundary=${boundary}`,
        'content-length': '1000000',
      },
    });
    req.on('error', () => {});
    req.write(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.bin"\r\n\r\n`);
    const trickle = setInterval(() => req.write('x'), 100);
    await waitFor(() => lines.some((line) => line.code === 'CLIENT_GONE'));
    clearInterval(trickle);
    req.destroy();
    await sleep(300);
    const upload = lines.filter((line) => line.req?.url === '/api/files');
    expect(upload.map((line) => [line.level, line.code])).toEqual([[30, 'CLIENT_GONE']]);
    expect(lines.filter((line) => line.level >= 40)).toEqual([]);
  });
});

describe('one line per request', () => {
  it('a refused request writes one line, with its status and the refusal code', async () => {
    const { app, lines, byRequest } = await loggedApp();
    const client = new TestClient(app);
    const user = await client.register(username(), PASSWORD);
    const anonymous = new TestClient(app);
    const csrf = await anonymous.csrfToken();
    const before = lines.length;

    await anonymous.request({ method: 'GET', url: '/api/me' });
    await anonymous.request({ method: 'POST', url: '/api/auth/logout', csrf: false });
    await anonymous.request({
      method: 'POST',
      url: '/api/auth/login',
      payload: { username: user.username, password: 'wrong password' },
    });
    await anonymous.request({ method: 'POST', url: '/api/auth/login', payload: { username: 'x' } });
    await anonymous.request({ method: 'GET', url: '/no/such/page' });
    // The form: refused, and answered with a redirect back to it.
    await anonymous.request({
      method: 'POST',
      url: '/login',
      payload: `username=${user.username}&password=wrong+password&_csrf=${encodeURIComponent(csrf)}`,
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });

    // (Less the client's own fetches of the token.)
    const written = lines.slice(before).filter((line) => line.req?.url !== '/api/csrf');
    expect(written.map((line) => [line.level, line.msg, line.res?.statusCode, line.code])).toEqual([
      [30, 'request completed', 401, 'UNAUTHENTICATED'],
      [30, 'request completed', 403, 'CSRF_INVALID'],
      [30, 'request completed', 401, 'INVALID_CREDENTIALS'],
      [30, 'request completed', 400, 'VALIDATION_FAILED'],
      [30, 'request completed', 404, 'NOT_FOUND'],
      [30, 'request completed', 303, 'INVALID_CREDENTIALS'],
    ]);
    expect(byRequest().every((group) => group.length === 1)).toBe(true);
    // A success says nothing of a code.
    await client.request({ method: 'GET', url: '/api/me' });
    expect(lines.at(-1)).toMatchObject({ msg: 'request completed', res: { statusCode: 200 } });
    expect(lines.at(-1)).not.toHaveProperty('code');
  });

  it("a fault of A's own is one line at error level, with the cause's stack", async () => {
    const { app, lines, byRequest } = await loggedApp();
    app.get('/test/fault', async () => {
      throw new Error('the disk caught fire');
    });
    const response = await app.inject({ method: 'GET', url: '/test/fault' });
    expect(response.json()).toMatchObject({ error: 'INTERNAL' });
    expect(response.body).not.toContain('disk');
    const requests = lines.filter((line) => line.reqId);
    expect(requests).toHaveLength(1);
    expect(requests[0]).toMatchObject({
      level: 50,
      msg: 'request completed',
      code: 'INTERNAL',
      res: { statusCode: 500 },
      err: { stack: expect.stringContaining('the disk caught fire') },
    });
    expect(byRequest()).toHaveLength(1);
  });
});
