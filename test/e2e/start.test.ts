/**
 * `npm start`, `npm run start:app` and `npm run start:download` as a user runs them: the npm
 * process itself, with only the ports set. Each prints one "ready" line once its servers are
 * ready, serves at once, and stops every server it started, with a drain, on SIGTERM, SIGINT and
 * SIGHUP of the npm process (npm forwards only the first two, and dies of the third).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { cp, mkdtemp, readFile, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, inject, it } from 'vitest';
import { SignedInClient } from '../support/http-client.ts';
import { freePort } from '../support/processes.ts';
import { signingKey } from '../support/signing-key.ts';
import { CHEAP_PASSWORDS } from '../support/stack.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

interface Started {
  npm: ChildProcess;
  output: () => string;
  appPort: number;
  downloadPort: number;
  /** Pids of the servers, from their "ready" log lines. */
  serverPids: number[];
  /** The same, by the server's log name (`app`, `download`). */
  pidOf: Record<string, number>;
}

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0)) await cleanup();
});

async function npmRun(script: string, servers: number, env: Record<string, string> = {}): Promise<Started> {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-start-'));
  // An initialised database, so the test does not wait for initdb.
  await cp(inject('pgliteTemplate'), join(dir, 'pg'), { recursive: true });
  const [appPort, downloadPort] = [await freePort(), await freePort()];
  const npm = spawn('npm', ['run', script], {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      DATA_DIR: dir,
      APP_PORT: String(appPort),
      DOWNLOAD_PORT: String(downloadPort),
      ...CHEAP_PASSWORDS,
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  npm.stdout?.on('data', (chunk) => {
    output += chunk;
  });
  npm.stderr?.on('data', (chunk) => {
    output += chunk;
  });
  const exited = once(npm, 'exit');
  cleanups.push(async () => {
    if (npm.exitCode === null && npm.signalCode === null) npm.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  });
  // The launcher's line, and each server's own (its output may arrive a moment later).
  const readyLines = () =>
    output
      .split('\n')
      .filter((line) => line.startsWith('{') && line.includes(' ready at '))
      .map((line) => JSON.parse(line) as { pid: number; name: string });
  const serverPids = () => readyLines().map((line) => line.pid);
  const deadline = Date.now() + 60_000;
  while (!/^ready: /m.test(output) || serverPids().length < servers) {
    if (npm.exitCode !== null || Date.now() > deadline) {
      await Promise.race([exited, sleep(1000)]);
      throw new Error(`npm run ${script} never said ready:\n${output}`);
    }
    await sleep(50);
  }
  const pidOf = Object.fromEntries(readyLines().map((line) => [line.name, line.pid]));
  return { npm, output: () => output, appPort, downloadPort, serverPids: serverPids(), pidOf };
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

const listening = (port: number) =>
  new Promise<boolean>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });

/** Sends `signal` to the npm process, then waits until every server it started has exited. */
async function expectStopsOn(started: Started, signal: NodeJS.Signals, servers: number) {
  expect(started.serverPids).toHaveLength(servers);
  started.npm.kill(signal);
  const deadline = Date.now() + 20_000;
  while (started.serverPids.some(alive) && Date.now() < deadline) await sleep(100);
  expect(started.serverPids.filter(alive), started.output()).toEqual([]);
  // Each drained (the servers' own shutdown line), rather than being killed.
  const drained = started
    .output()
    .split('\n')
    .filter((line) => line.includes('shutting down: draining requests in flight'));
  expect(drained, started.output()).toHaveLength(servers);
  expect(await listening(started.appPort)).toBe(false);
  expect(await listening(started.downloadPort)).toBe(false);
}

const SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];

describe('npm start', () => {
  it('with only the ports set: one ready line with both URLs, and a download works at once', async () => {
    const started = await npmRun('start', 2);
    const appUrl = `http://localhost:${started.appPort}`;
    const downloadUrl = `http://localhost:${started.downloadPort}`;
    const readyLines = started.output().match(/^ready: .*$/gm);
    expect(readyLines).toEqual([`ready: app server (A) at ${appUrl}, download server (B) at ${downloadUrl}`]);

    const client = await SignedInClient.signUp(appUrl, 'first-hour', 'correct horse battery');
    const form = new FormData();
    form.append('file', new Blob(['hello from A and B\n']), 'hello.txt');
    const upload = await client.json<{ file: { id: string } }>('/api/files', { method: 'POST', body: form });
    expect(upload.status).toBe(201);
    const mint = await client.json<{ url: string }>(`/api/files/${upload.body.file.id}/download-token`, {
      method: 'POST',
    });
    expect(mint.body.url.startsWith(`${downloadUrl}/d/`)).toBe(true);
    const download = await fetch(mint.body.url);
    expect(download.status).toBe(200);
    expect(await download.text()).toBe('hello from A and B\n');

    // One log line per request on each server, and B said "ready" only once it had keys.
    const deadline = Date.now() + 5_000;
    while (!/"name":"download".*"url":"\/d\/\[token\]/.test(started.output()) && Date.now() < deadline)
      await sleep(50);
    const entries = started
      .output()
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { name: string; msg: string; reqId?: string });
    for (const name of ['app', 'download']) {
      const requests = entries.filter((entry) => entry.name === name && entry.reqId);
      expect(requests.length, name).toBeGreaterThan(0);
      expect(requests.map((entry) => entry.msg)).toEqual(requests.map(() => 'request completed'));
      expect(new Set(requests.map((entry) => entry.reqId)).size).toBe(requests.length);
    }
    const b = entries.filter((entry) => entry.name === 'download').map((entry) => entry.msg);
    const readyAt = b.findIndex((msg) => msg.startsWith('download server (B) ready at'));
    expect(readyAt).toBeGreaterThan(b.indexOf('key set read: B can verify tokens'));
    expect(b.indexOf('key set read: B can verify tokens')).toBeGreaterThanOrEqual(0);
    await expectStopsOn(started, 'SIGTERM', 2);
  });

  // B is the public, stateless side: it must not hold what lets A sign (the key-encryption key,
  // the cookie secret) nor A's read-write storage credentials, whatever the shell exported.
  it("gives each server only what its config reads: A's secrets never reach B, each its own AWS user", async () => {
    const secrets = {
      KEY_ENCRYPTION_KEY: 'k'.repeat(43),
      SESSION_SECRET: 's'.repeat(40),
      AWS_ACCESS_KEY_ID: 'shared-key',
      AWS_SECRET_ACCESS_KEY: 'shared-secret',
      APP_AWS_ACCESS_KEY_ID: 'a-key',
      APP_AWS_SECRET_ACCESS_KEY: 'a-secret',
      DOWNLOAD_AWS_ACCESS_KEY_ID: 'b-key',
      DOWNLOAD_AWS_SECRET_ACCESS_KEY: 'b-secret',
      AWS_REGION: 'eu-west-3',
      SOME_OTHER_TOKEN: 'for another program',
      NODE_AUTH_TOKEN: 'npm registry token (CI)',
      NODE_OPTIONS: '--max-old-space-size=512',
    };
    const started = await npmRun('start', 2, secrets);
    const environ = async (pid: number | undefined) =>
      Object.fromEntries(
        (await readFile(`/proc/${pid}/environ`, 'utf8'))
          .split('\0')
          .filter(Boolean)
          .map((entry) => [entry.slice(0, entry.indexOf('=')), entry.slice(entry.indexOf('=') + 1)]),
      );
    const a = await environ(started.pidOf.app);
    const b = await environ(started.pidOf.download);
    expect(a).toMatchObject({
      KEY_ENCRYPTION_KEY: secrets.KEY_ENCRYPTION_KEY,
      SESSION_SECRET: secrets.SESSION_SECRET,
      AWS_ACCESS_KEY_ID: 'a-key',
      AWS_SECRET_ACCESS_KEY: 'a-secret',
      AWS_REGION: 'eu-west-3',
    });
    expect(b).toMatchObject({
      AWS_ACCESS_KEY_ID: 'b-key',
      AWS_SECRET_ACCESS_KEY: 'b-secret',
      AWS_REGION: 'eu-west-3',
      DATA_DIR: a.DATA_DIR,
      APP_PORT: String(started.appPort),
      PATH: expect.stringContaining('/usr/bin'),
    });
    for (const name of ['KEY_ENCRYPTION_KEY', 'SESSION_SECRET', 'ARGON2_MEMORY_KIB'])
      expect(b, name).not.toHaveProperty(name);
    for (const env of [a, b]) {
      for (const name of Object.keys(env)) expect(name).not.toMatch(/^(APP_AWS_|DOWNLOAD_AWS_|npm_)/);
      expect(env).not.toHaveProperty('SOME_OTHER_TOKEN');
      expect(env).not.toHaveProperty('NODE_AUTH_TOKEN');
      expect(env.NODE_OPTIONS).toContain('--max-old-space-size=512');
    }
    await expectStopsOn(started, 'SIGTERM', 2);
  });

  it.each(SIGNALS.filter((s) => s !== 'SIGTERM'))(
    'stops both servers with a drain on %s to npm',
    async (signal) => {
      await expectStopsOn(await npmRun('start', 2), signal, 2);
    },
  );
});

describe('npm run start:app and start:download', () => {
  it.each(SIGNALS)('start:app stops A with a drain on %s to npm', async (signal) => {
    await expectStopsOn(await npmRun('start:app', 1), signal, 1);
  });

  it.each(SIGNALS)('start:download stops B with a drain on %s to npm', async (signal) => {
    const dir = await mkdtemp(join(tmpdir(), 'sfh-start-keys-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const { jwksFile } = await signingKey(dir);
    await expectStopsOn(await npmRun('start:download', 1, { JWKS_FILE: jwksFile }), signal, 1);
  });
});
