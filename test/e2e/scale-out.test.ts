/**
 * Scale-out proof (README "Several replicas") on the real engines of the machine: two A replicas on one Postgres
 * schema, two B replicas on one Redis, all four as real processes sharing one storage folder.
 * A's replicas sit "behind one public origin" (APP_PUBLIC_URL is A1's origin for both), B's
 * likewise (DOWNLOAD_PUBLIC_URL is B1's origin for all B); the test plays the load balancer and
 * sends each request to the replica it chooses, with the token path taken from the minted url.
 *
 * Runs when TEST_DATABASE_URL is set (CI sets it); Redis from TEST_REDIS_URL, else the local one.
 * The Redis outage case runs its own throwaway redis-server on a free port and kills it.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/database.ts';
import { CookieJar } from '../support/http-client.ts';
import {
  APP_SERVER,
  DOWNLOAD_SERVER,
  freePort,
  type ServerProcess,
  startServer,
} from '../support/processes.ts';
import { killRedis, startRedis } from '../support/redis.ts';
import { freshPrefix, S3_SKIP, s3Env } from '../support/s3.ts';
import { skipUnless } from '../support/skip.ts';
import { CHEAP_PASSWORDS } from '../support/stack.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
const TOKENS = 100;
const GETS_PER_TOKEN = 50;
/** Rounds (one token each) in flight at once: 10 × 50 = 500 concurrent requests at most. */
const ROUNDS_IN_FLIGHT = 10;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');
const json = { 'content-type': 'application/json' };

/** The protected header of a compact JWS. */
function tokenHeader(token: string): { kid: string; alg: string; typ: string } {
  return JSON.parse(Buffer.from(token.split('.')[0] as string, 'base64url').toString('utf8'));
}

/**
 * One browser: one cookie, sent to whichever A replica the "load balancer" (the test) picks.
 * Sends the CSRF token of the session on state-changing requests, as SessionClient does.
 */
class Browser {
  readonly jar = new CookieJar();

  async fetch(origin: string, path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    const method = (init.method ?? 'GET').toUpperCase();
    if (!['GET', 'HEAD'].includes(method)) {
      const { body } = await this.json<{ token: string }>(origin, '/api/csrf');
      headers.set('x-csrf-token', body.token);
    }
    const cookie = this.jar.header();
    if (cookie) headers.set('cookie', cookie);
    const response = await fetch(new URL(path, origin), { ...init, headers, redirect: 'manual' });
    this.jar.update(response);
    return response;
  }

  async json<T>(origin: string, path: string, init: RequestInit = {}): Promise<{ status: number; body: T }> {
    const response = await this.fetch(origin, path, init);
    return { status: response.status, body: (await response.json()) as T };
  }
}

interface Minted {
  url: string;
  token: string;
  expiresAt: string;
}

/** Runs `task(i)` for i in 0..count-1, at most `limit` at a time; results in order. */
async function pool<T>(count: number, limit: number, task: (i: number) => Promise<T>): Promise<T[]> {
  const results: T[] = new Array(count);
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      results[i] = await task(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker));
  return results;
}

// On a shared local volume, and with the bytes in S3: then the replicas share nothing but the
// bucket (each on a DATA_DIR of its own), the B replicas with read-only credentials.
const storages: ('local' | 's3')[] = ['local', ...(S3_SKIP ? [] : (['s3'] as const))];
const postgres = skipUnless(
  'scale-out',
  !process.env.TEST_DATABASE_URL &&
    'needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test (and Redis on 127.0.0.1:6379)',
);
describe.skipIf(postgres.skip).each(storages)(
  `scale-out: two A on one Postgres, two B on one Redis (%s storage)${postgres.reason}`,
  (storage) => {
    let dataDir: string;
    let storageDir: string;
    let db: TestDatabase;
    const processes: ServerProcess[] = [];
    let a1: string;
    let a2: string;
    let b1: string;
    let b2: string;
    let appOrigin: string;
    let downloadOrigin: string;
    const keyPrefix = `test:scale-out:${randomUUID()}:`;
    const fileBytes = randomBytes(8 * 1024 + 3);
    let fileId: string;
    /** Signed in to A (on A1), used to mint for the single-use and rotation cases. */
    const owner = new Browser();

    const origin = (port: number) => `http://127.0.0.1:${port}`;

    const s3Prefix = freshPrefix();
    /** Where the bytes are: the shared volume, or the bucket with A's or B's credentials. */
    const storageEnv = (who: 'writer' | 'reader') =>
      storage === 's3' ? s3Env(s3Prefix, who) : { STORAGE_DIR: storageDir };

    /** Environment every process of the cluster shares. */
    const shared = () => ({
      APP_PUBLIC_URL: appOrigin,
      DOWNLOAD_PUBLIC_URL: downloadOrigin,
      JWKS_REFRESH_SECONDS: '1',
    });

    async function startA(port: number, sessionSecret: string, databaseUrl = db.url): Promise<ServerProcess> {
      const server = await startServer(
        APP_SERVER,
        {
          ...shared(),
          ...storageEnv('writer'),
          DATA_DIR: join(dataDir, `a-${port}`),
          DATABASE_URL: databaseUrl,
          SESSION_SECRET: sessionSecret,
          APP_PORT: String(port),
          ...CHEAP_PASSWORDS,
        },
        `${origin(port)}/readyz`,
      );
      processes.push(server);
      return server;
    }

    async function startB(port: number, redisUrl: string): Promise<ServerProcess> {
      const server = await startServer(
        DOWNLOAD_SERVER,
        {
          ...shared(),
          ...storageEnv('reader'),
          DATA_DIR: join(dataDir, `b-${port}`),
          DOWNLOAD_PORT: String(port),
          JWKS_URL: `${appOrigin}/.well-known/jwks.json`,
          REDIS_URL: redisUrl,
          REDIS_KEY_PREFIX: keyPrefix,
        },
        `${origin(port)}/readyz`,
      );
      processes.push(server);
      return server;
    }

    /** Mints a token for `id` through the A replica at `at`. */
    async function mint(browser: Browser, at: string, id = fileId): Promise<Minted> {
      const { status, body } = await browser.json<Minted>(at, `/api/files/${id}/download-token`, {
        method: 'POST',
      });
      expect(status).toBe(201);
      return body;
    }

    /** The minted url's path (`/d/<token>[/<name>]`) sent to one B replica directly. */
    const onReplica = (minted: Minted, at: string) => `${at}${new URL(minted.url).pathname}`;

    async function downloadBytes(url: string): Promise<{ status: number; bytes: Uint8Array }> {
      const response = await fetch(url);
      return { status: response.status, bytes: new Uint8Array(await response.arrayBuffer()) };
    }

    beforeAll(async () => {
      dataDir = await mkdtemp(join(tmpdir(), 'sfh-scale-out-'));
      storageDir = join(dataDir, 'files');
      db = await createTestDatabase();
      const [pa1, pa2, pb1, pb2] = [await freePort(), await freePort(), await freePort(), await freePort()];
      [a1, a2, b1, b2] = [origin(pa1), origin(pa2), origin(pb1), origin(pb2)];
      appOrigin = a1;
      downloadOrigin = b1;
      const sessionSecret = randomBytes(32).toString('base64url');
      // One after the other here; starting at once on an empty schema is a case of its own below.
      await startA(pa1, sessionSecret);
      await startA(pa2, sessionSecret);
      await Promise.all([startB(pb1, REDIS_URL), startB(pb2, REDIS_URL)]);

      const credentials = JSON.stringify({ username: 'carol', password: 'correct horse battery' });
      expect(
        (await owner.fetch(a1, '/api/auth/register', { method: 'POST', headers: json, body: credentials }))
          .status,
      ).toBe(201);
      const form = new FormData();
      form.append('file', new Blob([fileBytes], { type: 'application/octet-stream' }), 'replicated.bin');
      const upload = await owner.json<{ file: { id: string } }>(a1, '/api/files', {
        method: 'POST',
        body: form,
      });
      expect(upload.status, `${JSON.stringify(upload.body)}\n${processes[0]?.output()}`).toBe(201);
      fileId = upload.body.file.id;
    }, 120_000);

    afterAll(async () => {
      await Promise.all(processes.map((server) => server.stop()));
      await db?.close();
      // The replay keys would expire on their own; remove them now.
      const redis = new Redis(REDIS_URL, { lazyConnect: true, retryStrategy: () => null });
      redis.on('error', () => {});
      try {
        await redis.connect();
        const keys = await redis.keys(`${keyPrefix}*`);
        if (keys.length) await redis.del(...keys);
      } catch {
        // Redis is gone: its keys are too, or they expire.
      } finally {
        redis.disconnect();
      }
      if (dataDir) await rm(dataDir, { recursive: true, force: true });
    }, 60_000);

    it('two A replicas started at once on an empty schema both come up (migrations, first key)', async () => {
      // As an orchestrator starts replicas: both race for the migrations and the first signing key.
      const fresh = await createTestDatabase();
      const secret = randomBytes(32).toString('base64url');
      const ports = [await freePort(), await freePort()];
      const started = await Promise.allSettled(ports.map((port) => startA(port, secret, fresh.url)));
      try {
        for (const result of started) {
          if (result.status === 'rejected') throw result.reason;
        }
        const jwks = await Promise.all(
          ports.map(
            async (port) => (await (await fetch(`${origin(port)}/.well-known/jwks.json`)).json()) as object,
          ),
        );
        // One key set, not one first key per replica.
        expect(jwks[1]).toEqual(jwks[0]);
      } finally {
        await Promise.all(
          started.flatMap((result) => (result.status === 'fulfilled' ? [result.value.stop()] : [])),
        );
        await fresh.close();
      }
    }, 90_000);

    // Every GET reads the bucket before it claims (so that 404 and 416 consume nothing), and the
    // test store (Swift, one Python worker) serves ~200 GETs/s: fewer rounds, fewer at once.
    const tokensCount = storage === 's3' ? 40 : TOKENS;
    const roundsInFlight = storage === 's3' ? 2 : ROUNDS_IN_FLIGHT;

    it(`${GETS_PER_TOKEN} concurrent GETs with one token over both B → one 200, the rest 410; for ${tokensCount} tokens`, async () => {
      const started = performance.now();
      // Minted on both A replicas, through one session.
      const tokens = await pool(tokensCount, 8, (i) => mint(owner, i % 2 ? a2 : a1));
      const minted = performance.now();

      const totals = { ok: 0, used: 0, other: [] as string[] };
      const winsPerB = { b1: 0, b2: 0 };
      await pool(tokensCount, roundsInFlight, async (round) => {
        const token = tokens[round] as Minted;
        const results = await Promise.all(
          Array.from({ length: GETS_PER_TOKEN }, async (_, i) => {
            // Alternate over the replicas; which one comes first alternates per round too.
            const replica = (i + round) % 2 ? 'b2' : 'b1';
            const response = await fetch(onReplica(token, replica === 'b1' ? b1 : b2));
            const body = new Uint8Array(await response.arrayBuffer());
            return { replica, status: response.status, body };
          }),
        );
        const winners = results.filter((r) => r.status === 200);
        for (const r of results) {
          if (r.status === 200) {
            totals.ok++;
            expect(sha256(r.body)).toBe(sha256(fileBytes));
            winsPerB[r.replica as 'b1' | 'b2']++;
          } else if (r.status === 410) {
            totals.used++;
            expect(JSON.parse(Buffer.from(r.body).toString('utf8'))).toMatchObject({ error: 'TOKEN_USED' });
          } else {
            totals.other.push(
              `${r.replica}: ${r.status} ${Buffer.from(r.body).toString('utf8').slice(0, 200)}`,
            );
          }
        }
        expect(winners, `round ${round}: exactly one 200`).toHaveLength(1);
      });
      const elapsed = performance.now() - started;
      console.log(
        `scale-out: ${tokensCount} tokens × ${GETS_PER_TOKEN} concurrent GETs over 2 B on one Redis: ` +
          `${totals.ok} × 200 (B1 ${winsPerB.b1}, B2 ${winsPerB.b2}), ${totals.used} × 410, ` +
          `${totals.other.length} other; minting ${Math.round(minted - started)} ms, ` +
          `total ${Math.round(elapsed)} ms`,
      );
      expect(totals.other).toEqual([]);
      expect(totals.ok).toBe(tokensCount);
      expect(totals.used).toBe(tokensCount * (GETS_PER_TOKEN - 1));

      // One claim per token in the shared store, under this run's prefix.
      const redis = new Redis(REDIS_URL, { lazyConnect: true });
      try {
        await redis.connect();
        expect(await redis.keys(`${keyPrefix}*`)).toHaveLength(tokensCount);
      } finally {
        redis.disconnect();
      }
    }, 60_000);

    it('a session started on A1 works on A2; logging out on A2 kills it on A1', async () => {
      const browser = new Browser();
      const credentials = JSON.stringify({ username: 'carol', password: 'correct horse battery' });
      const login = await browser.fetch(a1, '/api/auth/login', {
        method: 'POST',
        headers: json,
        body: credentials,
      });
      expect(login.status).toBe(200);
      const me = await browser.json<{ user: { username: string } }>(a2, '/api/me');
      expect(me.status).toBe(200);
      expect(me.body.user.username).toBe('carol');

      // Upload on A2 (CSRF token and all), mint on A1, download from B2.
      const bytes = randomBytes(4096);
      const form = new FormData();
      form.append('file', new Blob([bytes], { type: 'text/plain' }), 'from-a2.txt');
      const upload = await browser.json<{ file: { id: string; sha256: string } }>(a2, '/api/files', {
        method: 'POST',
        body: form,
      });
      expect(upload.status).toBe(201);
      expect(upload.body.file.sha256).toBe(sha256(bytes));
      const listed = await browser.json<{ files: { id: string }[] }>(a1, '/api/files');
      expect(listed.body.files.map((f) => f.id)).toContain(upload.body.file.id);
      const token = await mint(browser, a1, upload.body.file.id);
      const download = await downloadBytes(onReplica(token, b2));
      expect(download.status).toBe(200);
      expect(sha256(download.bytes)).toBe(sha256(bytes));

      const cookie = browser.jar.header() ?? '';
      expect((await browser.fetch(a2, '/api/auth/logout', { method: 'POST' })).status).toBe(204);
      for (const replica of [a1, a2]) {
        const after = await fetch(`${replica}/api/me`, { headers: { cookie } });
        expect(after.status, `${replica}: the logged-out cookie`).toBe(401);
      }
    });

    it('login throttling is shared: failures spread over A1 and A2 add up to one limit', async () => {
      const browser = new Browser();
      const password = 'correct horse battery';
      const register = await browser.fetch(a1, '/api/auth/register', {
        method: 'POST',
        headers: json,
        body: JSON.stringify({ username: 'mallory-target', password }),
      });
      expect(register.status).toBe(201);
      const attempt = (at: string, pass: string) =>
        new Browser().fetch(at, '/api/auth/login', {
          method: 'POST',
          headers: json,
          body: JSON.stringify({ username: 'mallory-target', password: pass }),
        });
      // Five failures per account (the design's default), alternating between the replicas.
      for (let i = 0; i < 5; i++) {
        expect((await attempt(i % 2 ? a1 : a2, 'wrong password')).status, `failure ${i + 1}`).toBe(401);
      }
      for (const replica of [a1, a2]) {
        const throttled = await attempt(replica, password);
        expect(throttled.status, replica).toBe(429);
        expect(Number(throttled.headers.get('retry-after'))).toBeGreaterThan(0);
      }
    });

    it('a share link with maxDownloads 3: 20 concurrent downloads over A1 and A2 mint exactly 3 tokens, each good at B', async () => {
      const created = await owner.json<{ share: { id: string } }>(a1, `/api/files/${fileId}/shares`, {
        method: 'POST',
        headers: json,
        body: JSON.stringify({ maxDownloads: 3 }),
      });
      expect(created.status).toBe(201);
      const id = created.body.share.id;
      // No cookie, no CSRF token: what a recipient without an account sends.
      const answers = await Promise.all(
        Array.from({ length: 20 }, (_, i) =>
          fetch(`${i % 2 ? a2 : a1}/api/shares/${id}/download-token`, { method: 'POST' }).then(
            async (response) => ({
              status: response.status,
              body: (await response.json()) as Minted & { error?: string },
            }),
          ),
        ),
      );
      const minted = answers.filter((answer) => answer.status === 201);
      const refused = answers.filter((answer) => answer.status === 410);
      expect(minted).toHaveLength(3);
      expect(refused).toHaveLength(17);
      for (const answer of refused) expect(answer.body.error).toBe('SHARE_EXPIRED');
      for (const [i, answer] of minted.entries()) {
        const download = await downloadBytes(onReplica(answer.body, i % 2 ? b1 : b2));
        expect(download.status).toBe(200);
        expect(sha256(download.bytes)).toBe(sha256(fileBytes));
      }
      const listed = await owner.json<{ shares: { id: string; downloads: number }[] }>(a2, '/api/shares');
      expect(listed.body.shares.find((s) => s.id === id)?.downloads).toBe(3);
    });

    it('keys rotated through A1 (ops CLI): A2 mints with the new kid, both B accept it, old tokens still work', async () => {
      const before = await mint(owner, a2);
      const oldKid = tokenHeader(before.token).kid;

      const { stdout } = await promisify(execFile)(
        'npx',
        ['tsx', 'apps/app-server/src/keys-cli.ts', 'rotate', '--json'],
        {
          cwd: ROOT,
          env: {
            PATH: process.env.PATH,
            HOME: process.env.HOME,
            DATABASE_URL: db.url,
            JWKS_REFRESH_SECONDS: '1',
          },
        },
      );
      const newKid = (JSON.parse(stdout) as { kid: string; state: string }).kid;
      expect(newKid).not.toBe(oldKid);

      // The new key signs once B can know it (2 × JWKS_REFRESH_SECONDS) and A2's poll has seen it.
      const deadline = Date.now() + 20_000;
      let fresh = await mint(owner, a2);
      while (tokenHeader(fresh.token).kid !== newKid) {
        if (Date.now() > deadline) throw new Error(`A2 still signs with ${tokenHeader(fresh.token).kid}`);
        await sleep(250);
        fresh = await mint(owner, a2);
      }
      const second = await mint(owner, a2);
      expect(tokenHeader(second.token).kid).toBe(newKid);
      // Each replica polls on its own (every 2 s): A1 follows within one poll interval.
      const a1Deadline = Date.now() + 3_000;
      let fromA1 = await mint(owner, a1);
      while (tokenHeader(fromA1.token).kid !== newKid && Date.now() < a1Deadline) {
        await sleep(100);
        fromA1 = await mint(owner, a1);
      }
      expect(tokenHeader(fromA1.token).kid).toBe(newKid);

      for (const [token, replica] of [
        [fresh, b1],
        [second, b2],
        [before, b1],
      ] as const) {
        const download = await downloadBytes(onReplica(token, replica));
        expect(download.status, `${tokenHeader(token.token).kid} on ${replica}`).toBe(200);
        expect(sha256(download.bytes)).toBe(sha256(fileBytes));
      }
    }, 40_000);

    it('Redis down → both B answer 503 REPLAY_STORE_UNAVAILABLE and send nothing; Redis back → they recover', async () => {
      const redisPort = await freePort();
      const redisUrl = `redis://127.0.0.1:${redisPort}`;
      let redis = await startRedis(redisPort);
      const [pb3, pb4] = [await freePort(), await freePort()];
      const [b3, b4] = [origin(pb3), origin(pb4)];
      const [server3, server4] = await Promise.all([startB(pb3, redisUrl), startB(pb4, redisUrl)]);

      for (const replica of [b3, b4]) {
        const download = await downloadBytes(onReplica(await mint(owner, a1), replica));
        expect(download.status).toBe(200);
        expect(sha256(download.bytes)).toBe(sha256(fileBytes));
      }

      await killRedis(redis);
      for (const replica of [b3, b4]) {
        const response = await fetch(onReplica(await mint(owner, a2), replica));
        const body = Buffer.from(await response.arrayBuffer());
        expect(response.status, replica).toBe(503);
        expect(response.headers.get('content-type')).toMatch(/^application\/json/);
        expect(response.headers.get('content-disposition')).toBeNull();
        expect(body.includes(fileBytes.subarray(0, 64))).toBe(false);
        expect(JSON.parse(body.toString('utf8'))).toMatchObject({ error: 'REPLAY_STORE_UNAVAILABLE' });

        const ready = await fetch(`${replica}/readyz`);
        expect(ready.status).toBe(503);
        expect(((await ready.json()) as { missing: string[] }).missing).toContain('replay-store');
      }

      redis = await startRedis(redisPort);
      const restarted = performance.now();
      const deadline = Date.now() + 10_000;
      const recovered = new Set<string>();
      while (recovered.size < 2 && Date.now() < deadline) {
        for (const replica of [b3, b4]) {
          if ((await fetch(`${replica}/readyz`)).status === 200) recovered.add(replica);
        }
        if (recovered.size < 2) await sleep(100);
      }
      expect([...recovered].sort()).toEqual([b3, b4].sort());
      console.log(
        `scale-out: both B ready again ${Math.round(performance.now() - restarted)} ms after Redis returned`,
      );
      // The same processes, never restarted.
      expect(server3.child.exitCode).toBeNull();
      expect(server4.child.exitCode).toBeNull();
      for (const replica of [b3, b4]) {
        const download = await downloadBytes(onReplica(await mint(owner, a1), replica));
        expect(download.status, replica).toBe(200);
        expect(sha256(download.bytes)).toBe(sha256(fileBytes));
      }
    }, 60_000);
  },
);
