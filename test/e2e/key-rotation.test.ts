import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  calculateJwkThumbprint,
  decodeJwt,
  decodeProtectedHeader,
  exportJWK,
  generateKeyPair,
  type JWK,
  SignJWT,
} from 'jose';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SessionClient } from '../support/http-client.ts';
import { DOWNLOAD_SERVER, freePort, type ServerProcess, startServer } from '../support/processes.ts';
import { type Stack, startStack } from '../support/stack.ts';

// Key rotation proved end to end (README "Signing keys"): A and B as real processes on embedded PGlite, keys rotated and revoked through
// the ops CLI (which reaches A's database through A's socket) while downloads run.

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const REFRESH_SECONDS = 1;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/** Polls `check` every `everyMs` until it returns a value other than undefined, or throws at `timeoutMs`. */
async function until<T>(what: string, check: () => Promise<T | undefined>, timeoutMs: number, everyMs = 50) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

const CREDENTIALS = JSON.stringify({ username: 'keyholder', password: 'correct horse battery' });
const JSON_HEADERS = { 'content-type': 'application/json' };

const exited = (server: ServerProcess | undefined) =>
  server !== undefined && (server.child.exitCode !== null || server.child.signalCode !== null);

interface Minted {
  url: string;
  token: string;
  kid: string;
}

describe('signing keys rotate and revoke while downloads run (A and B as processes)', () => {
  let stack: Stack;
  let dataDir: string;
  let b2DataDir: string | undefined;
  let a: ServerProcess | undefined;
  let b: ServerProcess | undefined;
  let b2: ServerProcess | undefined;
  let appOrigin: string;
  let downloadOrigin: string;
  let appEnv: Record<string, string>;
  let user: SessionClient;
  let fileId: string;
  const bytes = randomBytes(64 * 1024 + 3);

  /** The ops CLI as an operator runs it, with A's environment (`npx tsx ... keys-cli.ts`). */
  function keysCli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    return new Promise((resolve, reject) => {
      execFile(
        'npx',
        ['tsx', 'apps/app-server/src/keys-cli.ts', ...args],
        {
          cwd: ROOT,
          env: { PATH: process.env.PATH, HOME: process.env.HOME, ...appEnv },
          timeout: 30_000,
        },
        (error, stdout, stderr) => {
          if (error && typeof error.code !== 'number') reject(error);
          else resolve({ code: error ? (error.code as number) : 0, stdout, stderr });
        },
      );
    });
  }

  async function mint(): Promise<Minted> {
    const { status, body } = await user.json<{ url: string; token: string }>(
      `/api/files/${fileId}/download-token`,
      { method: 'POST' },
    );
    if (status !== 201) throw new Error(`mint answered ${status}: ${JSON.stringify(body)}`);
    return { ...body, kid: decodeProtectedHeader(body.token).kid as string };
  }

  /** GET the token's URL: null when the bytes arrived intact, else what went wrong. */
  async function download(url: string): Promise<string | null> {
    const response = await fetch(url);
    const received = new Uint8Array(await response.arrayBuffer());
    if (response.status !== 200)
      return `${response.status} ${Buffer.from(received).toString('utf8').slice(0, 200)}`;
    return sha256(received) === sha256(bytes) ? null : `200 with ${received.length} wrong bytes`;
  }

  async function publishedKids(): Promise<string[]> {
    const response = await fetch(`${appOrigin}/.well-known/jwks.json`);
    return ((await response.json()) as { keys: JWK[] }).keys.map((key) => key.kid as string);
  }

  /** Polls HEAD (which never consumes a token) every 100 ms until B answers 403; resolves when. */
  async function refusedAt(url: string, timeoutMs: number): Promise<number> {
    return until(
      `B to refuse ${url.slice(0, 60)}...`,
      async () => ((await fetch(url, { method: 'HEAD' })).status === 403 ? Date.now() : undefined),
      timeoutMs,
      100,
    );
  }

  async function expectTokenInvalid(url: string) {
    const response = await fetch(url);
    expect(response.status).toBe(403);
    expect(await response.json()).toMatchObject({ error: 'TOKEN_INVALID' });
  }

  /** Mints until A signs with a key other than `kid` (A polls its database every 2 s). */
  async function mintAfter(kid: string): Promise<Minted> {
    return until(
      `A to sign with a key other than ${kid}`,
      async () => {
        const minted = await mint();
        return minted.kid === kid ? undefined : minted;
      },
      6_000,
      100,
    );
  }

  beforeAll(async () => {
    stack = await startStack({
      env: { JWKS_REFRESH_SECONDS: String(REFRESH_SECONDS) },
      appEnv: {
        TOKEN_TTL_SECONDS: '30',
        // This test mints far more than a person would; the per-user mint limit is not its subject.
        MINT_RATE_PER_MINUTE: '0',
      },
    });
    ({ dataDir, a, b, appOrigin, downloadOrigin, appEnv } = stack);

    user = new SessionClient(appOrigin);
    const register = await user.fetch('/api/auth/register', {
      method: 'POST',
      headers: JSON_HEADERS,
      body: CREDENTIALS,
    });
    expect(register.status).toBe(201);
    const form = new FormData();
    form.append('file', new Blob([bytes], { type: 'application/octet-stream' }), 'payload.bin');
    const upload = await user.json<{ file: { id: string } }>('/api/files', { method: 'POST', body: form });
    expect(upload.status).toBe(201);
    fileId = upload.body.file.id;
  }, 120_000);

  // Each test signs in afresh, so one that loses its session does not take the next ones along.
  // A failed test shows what the servers said.
  beforeEach(async ({ onTestFailed }) => {
    onTestFailed(() => {
      for (const [name, server] of Object.entries({ a, b, b2 }))
        if (server) console.log(`--- ${name} output ---\n${server.output()}`);
    });
    // Every test needs A; once it has died the rest fail at once (its output says why).
    if (!a || exited(a)) throw new Error('A is not running');
    user = new SessionClient(appOrigin);
    const login = await user.fetch('/api/auth/login', {
      method: 'POST',
      headers: JSON_HEADERS,
      body: CREDENTIALS,
    });
    expect(login.status).toBe(200);
  });

  afterAll(async () => {
    // b2 reads from the stack's data folder: stopped before that goes.
    await b2?.stop();
    await stack?.stop();
    if (b2DataDir) await rm(b2DataDir, { recursive: true, force: true });
  });

  it('3 rotations through the CLI while downloads run (≥ 10/s): zero failures', async () => {
    const failures: string[] = [];
    const kidsUsed = new Set<string>();
    const rotatedTo: string[] = [];
    const tookOver: boolean[] = [];
    let lastKid = '';
    let downloaded = 0;
    let running = true;

    // Two clients, each mint → download → compare in a loop, with a fresh token every time.
    const worker = async () => {
      while (running) {
        try {
          const minted = await mint();
          kidsUsed.add(minted.kid);
          lastKid = minted.kid;
          const problem = await download(minted.url);
          if (problem) failures.push(`kid ${minted.kid}: ${problem}`);
          else downloaded += 1;
        } catch (error) {
          failures.push(String(error));
        }
      }
    };
    const started = Date.now();
    const workers = [worker(), worker()];
    try {
      await until('the first download', async () => (downloaded > 0 ? true : undefined), 5_000);
      for (let rotation = 1; rotation <= 3; rotation += 1) {
        const result = await keysCli('--json', 'rotate');
        expect(result, result.stderr).toMatchObject({ code: 0 });
        const { kid, state } = JSON.parse(result.stdout) as { kid: string; state: string };
        expect(state).toBe('next');
        expect(kidsUsed.has(kid)).toBe(false);
        rotatedTo.push(kid);
        // Published before it signs: 2 × refresh, then A's 2 s poll; wait until tokens carry it.
        const signing = await until(
          `key ${kid} to sign`,
          async () => (lastKid === kid ? true : exited(a) ? false : undefined),
          10_000,
        ).catch(() => false);
        tookOver.push(signing);
        if (!signing) break;
      }
      // A little more traffic on the last key.
      await sleep(500);
    } finally {
      running = false;
      await Promise.all(workers);
    }
    const seconds = (Date.now() - started) / 1000;
    const rate = downloaded / seconds;
    console.log(
      `${downloaded} downloads in ${seconds.toFixed(1)} s (${rate.toFixed(1)}/s) across 3 rotations, ` +
        `${kidsUsed.size} signing keys, ${failures.length} failed`,
    );
    expect(failures.length, `first failures:\n${failures.slice(0, 5).join('\n')}`).toBe(0);
    expect(tookOver, `rotated to ${rotatedTo.join(', ')}`).toEqual([true, true, true]);
    expect(kidsUsed.size).toBeGreaterThanOrEqual(3);
    expect(rate).toBeGreaterThanOrEqual(10);
  }, 60_000);

  it('revoking the current key: B refuses its tokens within JWKS_REFRESH_SECONDS; new tokens work', async () => {
    const held = await mint();
    expect((await fetch(held.url, { method: 'HEAD' })).status).toBe(200);

    // The revocation takes effect when the key leaves A's JWKS (the CLI's commit); measure from
    // then to B's first refusal, watching both from before the CLI starts.
    const removed = until(
      `key ${held.kid} to leave A's JWKS`,
      async () => ((await publishedKids()).includes(held.kid) ? undefined : Date.now()),
      20_000,
    );
    const refused = refusedAt(held.url, 20_000);
    // Handled here too, so a failing CLI below does not leave them rejecting unobserved.
    removed.catch(() => {});
    refused.catch(() => {});
    const result = await keysCli('revoke', held.kid);
    expect(result, result.stderr).toMatchObject({ code: 0 });
    expect(result.stdout).toContain(held.kid);
    const [removedAt, refusedAtMs] = await Promise.all([removed, refused]);
    const delay = refusedAtMs - removedAt;
    console.log(`revocation: B refused the revoked key's token ${delay} ms after it left A's JWKS`);
    expect(delay).toBeLessThanOrEqual((REFRESH_SECONDS + 1.5) * 1000);
    await expectTokenInvalid(held.url);

    // Once A's poll picks up the key that took over, its tokens download.
    const fresh = await mintAfter(held.kid);
    expect(await download(fresh.url)).toBeNull();
  }, 60_000);

  it('SIGHUP: a B with a 30 s refresh refuses a revoked key within 1 s of the signal', async () => {
    // A second B on another port that refreshes rarely. Same storage and token audience (it
    // stands in for B), its own DATA_DIR: the in-memory replay journal belongs to one process.
    const port = await freePort();
    const origin = `http://127.0.0.1:${port}`;
    b2DataDir = await mkdtemp(join(tmpdir(), 'sfh-keys-b2-'));
    b2 = await startServer(
      DOWNLOAD_SERVER,
      {
        DATA_DIR: b2DataDir,
        STORAGE_DIR: join(dataDir, 'files'),
        APP_PUBLIC_URL: appOrigin,
        DOWNLOAD_PUBLIC_URL: downloadOrigin,
        JWKS_URL: `${appOrigin}/.well-known/jwks.json`,
        JWKS_REFRESH_SECONDS: '30',
        DOWNLOAD_PORT: String(port),
      },
      `${origin}/readyz`,
    );
    const held = await mint();
    const url = `${origin}/d/${held.token}`;
    expect((await fetch(url, { method: 'HEAD' })).status).toBe(200);

    const result = await keysCli('revoke', held.kid);
    expect(result, result.stderr).toMatchObject({ code: 0 });
    expect(await publishedKids()).not.toContain(held.kid);
    // Gone from A, yet this B has not re-read the set: the token still works...
    expect((await fetch(url, { method: 'HEAD' })).status).toBe(200);
    await sleep((REFRESH_SECONDS + 0.5) * 1000);
    expect((await fetch(url, { method: 'HEAD' })).status).toBe(200);

    // ...until the operator's reload.
    const signalled = Date.now();
    process.kill(b2.child.pid as number, 'SIGHUP');
    const delay = (await refusedAt(url, 5_000)) - signalled;
    console.log(`SIGHUP: B refused the revoked key's token ${delay} ms after the signal`);
    expect(delay).toBeLessThanOrEqual(1_000);
    await expectTokenInvalid(url);
    expect(b2.child.exitCode).toBeNull();

    // A carries on with the key that took over (B learns it by its refresh).
    const fresh = await mintAfter(held.kid);
    expect(await download(fresh.url)).toBeNull();
  }, 60_000);

  it('a key that signs before it is published is refused', async () => {
    // Why next → current: B can tell a key of A's only by finding its kid in A's JWKS. A token
    // with a kid B does not know makes B re-read the set (at most once per cooldown, so a flood
    // of made-up kids cannot hammer A) and, if the kid is still missing, refuse it: B cannot tell
    // "A started signing before I fetched" from "someone else's key". So a key must be published
    // (state next) at least one refresh interval before it signs, or its first tokens fail.
    // This token is exactly that case: well-formed claims, a key no JWKS has ever listed.
    const real = await mint();
    const { privateKey, publicKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519' });
    const kid = await calculateJwkThumbprint(await exportJWK(publicKey));
    const now = Math.floor(Date.now() / 1000);
    const forged = await new SignJWT({
      ...decodeJwt(real.token),
      jti: randomBytes(18).toString('base64url'),
      iat: now,
      nbf: now - 5,
      exp: now + 30,
    })
      .setProtectedHeader({ alg: 'EdDSA', kid, typ: 'dl+jwt' })
      .sign(privateKey);
    expect(decodeJwt(forged)).toMatchObject({ iss: appOrigin, aud: downloadOrigin, fid: fileId });

    const response = await fetch(`${downloadOrigin}/d/${forged}`);
    expect(response.status).toBe(403);
    expect(await response.json()).toMatchObject({ error: 'TOKEN_INVALID' });
    expect(await publishedKids()).not.toContain(kid);
    // The same claims under A's published key are fine: only the unpublished key was refused.
    expect(await download(real.url)).toBeNull();
  });

  it('A stopped: B goes on serving tokens already minted, on its last good key set', async () => {
    const first = await mint();
    const second = await mint();
    const server = a as ServerProcess;
    server.child.kill('SIGTERM');
    expect(await server.stop()).toBe(0);

    expect(await download(first.url)).toBeNull();

    // After a failed refresh B says it is serving on a stale set, and stays ready.
    await until(
      'B to report a stale key set in /metrics',
      async () => {
        const metrics = await (await fetch(`${downloadOrigin}/metrics`)).text();
        return /^jwks_stale 1$/m.test(metrics) ? true : undefined;
      },
      (REFRESH_SECONDS + 4) * 1000,
      200,
    );
    expect(await download(second.url)).toBeNull();

    const ready = await fetch(`${downloadOrigin}/readyz`);
    const body = (await ready.json()) as { keys: { stale?: boolean; lastError: string | null } };
    expect(ready.status).toBe(200);
    expect(body.keys.lastError).toEqual(expect.any(String));
    expect(body.keys.stale).toBe(true);
  }, 30_000);
});
