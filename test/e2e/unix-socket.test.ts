/**
 * `APP_SOCKET_PATH` / `DOWNLOAD_SOCKET_PATH`: a server listens on a Unix socket in a private
 * folder besides its TCP port, so a proxy on the same host need not be trusted by address. With
 * `TRUST_PROXY=127.0.0.1` any local user who connects to A's port directly picks their own client
 * IP and walks past every per-IP limit; with `TRUST_PROXY=unix` only the socket's peers (whom the
 * folder lets in) may say who the client is.
 */
import { chmod, cp, mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import { request } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, inject, it, onTestFinished } from 'vitest';
import {
  APP_SERVER,
  DOWNLOAD_SERVER,
  freePort,
  type ServerProcess,
  startServer,
} from '../support/processes.ts';
import { signingKey } from '../support/signing-key.ts';
import { CHEAP_PASSWORDS } from '../support/stack.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** GET `path` over the Unix socket `socketPath` (or TCP `port`), with `headers`: the status. */
function get(target: { socketPath: string } | { port: number }, path: string, headers = {}) {
  return new Promise<number>((resolve, reject) => {
    const where = 'socketPath' in target ? target : { host: '127.0.0.1', port: target.port };
    request({ ...where, path, headers, agent: false }, (response) => {
      response.resume();
      resolve(response.statusCode as number);
    })
      .on('error', reject)
      .end();
  });
}

const connects = (socketPath: string) =>
  new Promise<boolean>((resolve) => {
    const socket = connect(socketPath);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });

async function dataDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-socket-'));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  await cp(inject('pgliteTemplate'), join(dir, 'data', 'pg'), { recursive: true });
  return dir;
}

async function startApp(dir: string, env: Record<string, string>): Promise<ServerProcess & { port: number }> {
  const port = await freePort();
  const a = await startServer(
    APP_SERVER,
    { DATA_DIR: join(dir, 'data'), APP_PORT: String(port), LOG_LEVEL: 'info', ...CHEAP_PASSWORDS, ...env },
    `http://127.0.0.1:${port}/readyz`,
  );
  onTestFinished(() => a.stop().then(() => undefined));
  return Object.assign(a, { port });
}

/** The client address A logged for the request to `path` (its `request.ip`). */
async function loggedAddress(a: ServerProcess, path: string): Promise<string | undefined> {
  const deadline = Date.now() + 5_000;
  for (;;) {
    const line = a
      .output()
      .split('\n')
      .filter((entry) => entry.startsWith('{'))
      .map((entry) => JSON.parse(entry) as { req?: { url?: string; remoteAddress?: string } })
      .find((entry) => entry.req?.url === path);
    if (line || Date.now() > deadline) return line?.req?.remoteAddress;
    await sleep(50);
  }
}

it('A answers on its socket (0660, in a 0700 folder) and its port; TRUST_PROXY=unix believes the socket only; SIGTERM closes both', async () => {
  const dir = await dataDir();
  const socketPath = join(dir, 'run', 'app.sock');
  const a = await startApp(dir, { APP_SOCKET_PATH: socketPath, TRUST_PROXY: 'unix' });
  expect((await stat(socketPath)).mode & 0o777).toBe(0o660);
  expect((await stat(join(dir, 'run'))).mode & 0o777).toBe(0o700);
  expect(a.output()).toContain(`unix:${socketPath}`);

  expect(await get({ socketPath }, '/healthz', { 'x-forwarded-for': '203.0.113.7' })).toBe(200);
  expect(await loggedAddress(a, '/healthz')).toBe('203.0.113.7');
  // A local user on the TCP port cannot choose their address: the port's peers are not proxies.
  expect(await get({ port: a.port }, '/readyz', { 'x-forwarded-for': '198.51.100.9' })).toBe(200);
  expect(await loggedAddress(a, '/readyz')).toBe('127.0.0.1');

  expect(await a.stop()).toBe(0);
  expect(a.output()).toContain('shutting down: draining requests in flight');
  await expect(stat(socketPath)).rejects.toThrow(/ENOENT/);
  expect(await connects(socketPath)).toBe(false);
  await expect(get({ port: a.port }, '/healthz')).rejects.toThrow(/ECONNREFUSED/);
}, 60_000);

it.each([
  ['127.0.0.1', '0.0.0.0'],
  ['false', '0.0.0.0'],
])(
  'with TRUST_PROXY=%s, X-Forwarded-For on the socket is ignored (the peer is %s)',
  async (trust, address) => {
    const dir = await dataDir();
    const socketPath = join(dir, 'run', 'app.sock');
    const a = await startApp(dir, { APP_SOCKET_PATH: socketPath, TRUST_PROXY: trust });
    expect(await get({ socketPath }, '/healthz', { 'x-forwarded-for': '203.0.113.7' })).toBe(200);
    expect(await loggedAddress(a, '/healthz')).toBe(address);
  },
  60_000,
);

it('A refuses a socket folder other users can enter, and names it', async () => {
  const dir = await dataDir();
  await mkdir(join(dir, 'open'), { mode: 0o755 });
  await chmod(join(dir, 'open'), 0o755);
  const socketPath = join(dir, 'open', 'app.sock');
  const port = await freePort();
  const error = await startServer(
    APP_SERVER,
    { DATA_DIR: join(dir, 'data'), APP_PORT: String(port), APP_SOCKET_PATH: socketPath },
    `http://127.0.0.1:${port}/readyz`,
  ).then(
    () => undefined,
    (failed: Error) => failed,
  );
  expect(error?.message).toContain(
    `the folder of the socket ${socketPath} must be closed to other users (mode 0700, or 0750 with the proxy's group)`,
  );
  await expect(stat(socketPath)).rejects.toThrow(/ENOENT/);
}, 60_000);

it('B answers on its socket too, and drains both on SIGTERM', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-socket-b-'));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  const { jwksFile } = await signingKey(dir);
  const socketPath = join(dir, 'run', 'download.sock');
  const port = await freePort();
  const b = await startServer(
    DOWNLOAD_SERVER,
    {
      DATA_DIR: join(dir, 'data'),
      DOWNLOAD_PORT: String(port),
      JWKS_FILE: jwksFile,
      DOWNLOAD_SOCKET_PATH: socketPath,
    },
    `http://127.0.0.1:${port}/readyz`,
  );
  onTestFinished(() => b.stop().then(() => undefined));
  expect(await get({ socketPath }, '/readyz')).toBe(200);
  expect((await stat(socketPath)).mode & 0o777).toBe(0o660);
  expect(await b.stop()).toBe(0);
  expect(await connects(socketPath)).toBe(false);
  await expect(get({ port }, '/healthz')).rejects.toThrow(/ECONNREFUSED/);
}, 60_000);
