/**
 * One download per token (README "One download per token") with real
 * clients against B as a real process: `aria2c -x 4 -s 4`, and `aria2c -c`, `curl -C -` and
 * `wget -c` resuming on the same B URL after the first run was killed mid-download. Each result is
 * compared with the original by sha256, and the bytes B wrote for the token (its /metrics) are
 * checked against the bound, `size + min(size, 8 × RESEND_MARGIN_BYTES)` plus the responses'
 * heads. Also: a finished URL is refused (410) when fetched again; a client that reads a little and
 * drops, 100 times, gets no more than the bound; and 50 concurrent full GETs of one token across two
 * B on one Redis give the bytes to exactly one.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { get } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FileClaims } from '@sfh/download-token';
import { nanoid } from 'nanoid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type B, startB } from '../support/download-server-alone.ts';
import { redisAnswers } from '../support/redis.ts';
import { skipUnless } from '../support/skip.ts';

const MIB = 1024 * 1024;
const SIZE = 40 * MIB;
const MARGIN = 16 * MIB;
const BOUND = SIZE + Math.min(SIZE, 8 * MARGIN);
/** A response's head (status line and headers) or a 410's JSON: well under this many bytes. */
const HEAD_SLACK = 2048;
const CLIENTS = ['/usr/bin/curl', '/usr/bin/wget', '/usr/bin/aria2c'];
const REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs a client to completion; resolves with its exit code and output, never rejects. */
function run(file: string, args: string[], cwd: string): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { cwd, timeout: 60_000, maxBuffer: 16 * MIB }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      resolve({ code, output: `${stdout}${stderr}` });
    });
  });
}

/** Starts a client and SIGKILLs it once `out` holds at least `bytes` (a user's Ctrl-C, a crash). */
async function killMidway(file: string, args: string[], cwd: string, out: string, bytes: number) {
  const child: ChildProcess = spawn(file, args, { cwd, stdio: 'ignore' });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const deadline = Date.now() + 30_000;
  for (;;) {
    const size = (await stat(out).catch(() => undefined))?.size ?? 0;
    if (size >= bytes) break;
    if (child.exitCode !== null || Date.now() > deadline)
      throw new Error(`${file} ended (${child.exitCode}) before it was killed, with ${size} bytes`);
    await sleep(20);
  }
  child.kill('SIGKILL');
  await exited;
  const got = (await stat(out)).size;
  expect(got, 'the kill came mid-download').toBeLessThan(SIZE);
  return got;
}

/** A counter of B's /metrics (0 when it has no sample yet). */
async function metric(b: B, name: string): Promise<number> {
  const text = await (await fetch(`${b.origin}/metrics`)).text();
  const line = new RegExp(`^${name.replaceAll(/[{}"]/g, '\\$&')} (\\S+)$`, 'm').exec(text);
  return line ? Number(line[1]) : 0;
}

/** What B wrote to clients (heads included) and how many download requests it answered, meanwhile. */
async function measured<T>(b: B, work: () => Promise<T>) {
  const requests = async () => {
    const text = await (await fetch(`${b.origin}/metrics`)).text();
    return [...text.matchAll(/^download_requests_total\{[^}]*\} (\S+)$/gm)].reduce(
      (n, m) => n + Number(m[1]),
      0,
    );
  };
  const [bytes0, requests0] = [await metric(b, 'download_bytes_sent_total'), await requests()];
  const result = await work();
  // The last response's count lands when it has ended on B's side.
  await sleep(200);
  const sent = (await metric(b, 'download_bytes_sent_total')) - bytes0;
  const responses = (await requests()) - requests0;
  return { result, sent, responses };
}

const clients = skipUnless(
  'real resuming clients',
  !CLIENTS.every(existsSync) && 'no curl, wget or aria2c (apt-get install -y curl wget aria2)',
);
describe.skipIf(clients.skip)(
  `one download per token with real clients on one B URL${clients.reason}`,
  () => {
    let b: B;
    let work: string;
    let file: FileClaims;
    const original = randomBytes(SIZE);
    const digest = sha256(original);

    beforeAll(async () => {
      work = await mkdtemp(join(tmpdir(), 'sfh-e2e-resume-'));
      b = await startB();
      file = await b.put(original, 'big.bin');
    }, 120_000);

    afterAll(async () => {
      await b?.stop();
      await rm(work, { recursive: true, force: true });
    });

    /** A fresh token's URL, with the file name as its cosmetic last segment (aria2 names files so). */
    const fresh = async () => `${b.url(await b.mint(file))}/big.bin`;

    async function expectOriginal(out: string): Promise<void> {
      const received = await readFile(out);
      expect(received.length).toBe(SIZE);
      expect(sha256(received)).toBe(digest);
    }

    function expectWithinBound(sent: number, responses: number): void {
      expect(sent).toBeGreaterThanOrEqual(SIZE);
      expect(sent).toBeLessThanOrEqual(BOUND + responses * HEAD_SLACK);
    }

    it('aria2c -x 4 -s 4 on a bare B URL: four connections, one token, the file intact', async () => {
      const url = await fresh();
      const { result, sent, responses } = await measured(b, () =>
        run(
          '/usr/bin/aria2c',
          ['-x', '4', '-s', '4', '-k', '1M', '--file-allocation=none', '-d', work, '-o', 'aria-x4.bin', url],
          work,
        ),
      );
      expect(result.code, `${result.output}\n${b.server.output()}`).toBe(0);
      await expectOriginal(join(work, 'aria-x4.bin'));
      expectWithinBound(sent, responses);
      console.info(
        `aria2c -x 4: B sent ${sent} bytes in ${responses} responses (file ${SIZE}, bound ${BOUND})`,
      );
    });

    for (const client of [
      {
        name: 'curl -C -',
        file: '/usr/bin/curl',
        first: (out: string, url: string) => ['-s', '-f', '--limit-rate', '4M', '-o', out, url],
        resume: (out: string, url: string) => ['-s', '-S', '-f', '-C', '-', '-o', out, url],
      },
      {
        name: 'wget -c',
        file: '/usr/bin/wget',
        first: (out: string, url: string) => ['-q', '--limit-rate=4m', '-O', out, url],
        resume: (out: string, url: string) => ['-nv', '-c', '-O', out, url],
      },
      {
        name: 'aria2c -c',
        file: '/usr/bin/aria2c',
        first: (out: string, url: string) => [
          '-q',
          '--max-download-limit=4M',
          '--file-allocation=none',
          '-d',
          work,
          '-o',
          out.slice(work.length + 1),
          url,
        ],
        resume: (out: string, url: string) => [
          '-c',
          '--file-allocation=none',
          '-d',
          work,
          '-o',
          out.slice(work.length + 1),
          url,
        ],
      },
    ]) {
      it(`${client.name} on the same B URL after the first run was killed mid-download`, async () => {
        const url = await fresh();
        const out = join(work, `${nanoid(8)}.bin`);
        const { result, sent, responses } = await measured(b, async () => {
          const got = await killMidway(client.file, client.first(out, url), work, out, 8 * MIB);
          const resumed = await run(client.file, client.resume(out, url), work);
          return { got, resumed };
        });
        expect(result.resumed.code, `${result.resumed.output}\n${b.server.output()}`).toBe(0);
        await expectOriginal(out);
        expectWithinBound(sent, responses);
        console.info(
          `${client.name}: killed at ${result.got} bytes; B sent ${sent} bytes in ${responses} responses (file ${SIZE}, bound ${BOUND})`,
        );
      });
    }

    it('a second full download of a finished URL is refused with 410 TOKEN_USED', async () => {
      const url = await fresh();
      const out = join(work, 'twice.bin');
      const first = await run('/usr/bin/curl', ['-s', '-S', '-f', '-o', out, url], work);
      expect(first.code, first.output).toBe(0);
      await expectOriginal(out);
      const again = await fetch(url, { headers: { accept: 'application/json' } });
      expect(again.status).toBe(410);
      expect(await again.json()).toMatchObject({
        error: 'TOKEN_USED',
        renewUrl: `http://a.test/files/${file.fid}/download`,
      });
    });

    it('a client that connects, reads a little and drops, 100 times, gets no more than the bound', async () => {
      const url = await fresh();
      const statuses: number[] = [];
      const { sent, responses } = await measured(b, async () => {
        for (let i = 0; i < 100; i++) {
          statuses.push(
            await new Promise<number>((resolve, reject) => {
              const request = get(url, { headers: { accept: 'application/json' } }, (res) => {
                const status = res.statusCode ?? 0;
                if (status !== 200) {
                  res.resume();
                  res.on('end', () => resolve(status));
                  return;
                }
                res.once('data', () => {
                  request.destroy();
                  resolve(status);
                });
              });
              request.on('error', reject);
            }),
          );
        }
      });
      const served = statuses.filter((status) => status === 200).length;
      expect(served).toBeGreaterThan(0);
      expect(served).toBeLessThanOrEqual(32);
      expect(statuses.slice(-10).every((status) => status === 410)).toBe(true);
      expect(sent).toBeLessThanOrEqual(BOUND + responses * HEAD_SLACK);
      console.info(`100 drops: ${served} responses sent bytes; B sent ${sent} bytes (bound ${BOUND})`);
    });
  },
);

const redis = skipUnless(
  'two B on one Redis',
  !(await redisAnswers(REDIS_URL)) &&
    `no Redis answers at ${REDIS_URL} (start redis-server, or set TEST_REDIS_URL)`,
);
describe.skipIf(redis.skip)(`one download per token across two B on one Redis${redis.reason}`, () => {
  let b1: B;
  let b2: B;
  const original = randomBytes(SIZE);

  beforeAll(async () => {
    const env = { REDIS_URL, REDIS_KEY_PREFIX: `test:${nanoid()}:` };
    b1 = await startB(env);
    // The second replica: the same keys, files and public origin, its own data folder.
    b2 = await startB({
      ...env,
      JWKS_FILE: b1.jwksFile,
      STORAGE_DIR: b1.storageDir,
      DOWNLOAD_PUBLIC_URL: b1.origin,
    });
  }, 120_000);

  afterAll(async () => {
    await b2?.stop();
    await b1?.stop();
  });

  it('50 concurrent full GETs of one token, alternating between the replicas: exactly one gets the bytes', async () => {
    const file = await b1.put(original);
    const path = new URL(b1.url(await b1.mint(file))).pathname;
    const responses = await Promise.all(
      Array.from({ length: 50 }, async (_, i) => {
        const res = await fetch(`${(i % 2 ? b2 : b1).origin}${path}`, {
          headers: { accept: 'application/json' },
        });
        return { status: res.status, body: Buffer.from(await res.arrayBuffer()) };
      }),
    );
    const ok = responses.filter((res) => res.status === 200);
    expect(ok).toHaveLength(1);
    expect(sha256(ok[0]?.body as Buffer)).toBe(sha256(original));
    const used = responses.filter((res) => res.status === 410);
    expect(used).toHaveLength(49);
    for (const res of used) expect(JSON.parse(res.body.toString()).error).toBe('TOKEN_USED');
  });
});
