/**
 * Sustained load: 200 concurrent downloads (a fresh token from A for each, a 256 KiB
 * file from B) and 50 concurrent uploads (64 KiB to A) against both servers as real processes for
 * SOAK_SECONDS (default 60). No request may fail, and both servers' memory (RSS, sampled every
 * second) stays bounded. Prints the figures as a markdown table for the README.
 *
 * `npm run test:soak` (test/soak/vitest.config.ts); not part of `npm test`. With TEST_DATABASE_URL
 * (CI) A runs on that Postgres, otherwise on embedded PGlite, which lives inside A's process: its
 * memory is then part of A's RSS (about 450-900 MiB before any load), so A's bound there is its
 * RSS after start-up plus the same margin.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SignedInClient } from '../support/http-client.ts';
import { rss } from '../support/process-stats.ts';
import type { ServerProcess } from '../support/processes.ts';
import { type Stack, startStack } from '../support/stack.ts';

const KIB = 1024;
const MIB = 1024 * KIB;
const SOAK_SECONDS = Number(process.env.SOAK_SECONDS ?? 60);
const DOWNLOADERS = 200;
const UPLOADERS = 50;
/** Uploads of one user wait for each other (quota lock), so they are spread over several users. */
const UPLOAD_USERS = 10;
const DOWNLOAD_SIZE = 256 * KIB;
const UPLOAD_SIZE = 64 * KIB;
/** RSS a server may use (A on embedded PGlite: on top of its RSS after start-up). */
const RSS_LIMIT = Number(process.env.SOAK_RSS_LIMIT_MIB ?? 400) * MIB;
const PASSWORD = 'correct horse battery';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');
const mib = (bytes: number) => `${(bytes / MIB).toFixed(0)} MiB`;

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] as number;
}

/** Uploads `content` as `name` in one multipart request. */
function upload(client: SignedInClient, content: Uint8Array, name: string): Promise<Response> {
  const form = new FormData();
  form.append('file', new Blob([content]), name);
  return client.fetch('/api/files', { method: 'POST', body: form });
}

describe.skipIf(!process.env.SFH_SOAK)(
  `soak: ${DOWNLOADERS} downloads and ${UPLOADERS} uploads at once`,
  () => {
    const onPostgres = Boolean(process.env.TEST_DATABASE_URL);
    const database = onPostgres ? 'Postgres' : 'embedded PGlite';
    let stack: Stack;
    let storageDir: string;
    let a: ServerProcess;
    let b: ServerProcess;
    let appOrigin: string;

    beforeAll(async () => {
      stack = await startStack({
        database: onPostgres ? 'postgres' : 'embedded',
        // Thousands of tokens a minute for one user: the per-user mint limit would be the test.
        appEnv: { MINT_RATE_PER_MINUTE: '0' },
      });
      ({ a, b, appOrigin } = stack);
      storageDir = join(stack.dataDir, 'files');
    }, 120_000);

    afterAll(() => stack?.stop());

    it(`no errors and bounded memory for ${SOAK_SECONDS} s`, async () => {
      const owner = await SignedInClient.signUp(appOrigin, 'soak-owner', PASSWORD);
      const uploaders = await Promise.all(
        Array.from({ length: UPLOAD_USERS }, (_, i) =>
          SignedInClient.signUp(appOrigin, `soak-uploader-${i}`, PASSWORD),
        ),
      );
      const served = randomBytes(DOWNLOAD_SIZE);
      const servedHash = sha256(served);
      const stored = await upload(owner, served, 'soak.bin');
      expect(stored.status).toBe(201);
      const fileId = ((await stored.json()) as { file: { id: string } }).file.id;

      const pids = { a: a.child.pid as number, b: b.child.pid as number };
      const startRss = { a: await rss(pids.a), b: await rss(pids.b) };
      const limit = { a: onPostgres ? RSS_LIMIT : startRss.a + RSS_LIMIT, b: RSS_LIMIT };
      const peak = { ...startRss };
      const sampler = setInterval(async () => {
        for (const server of ['a', 'b'] as const) {
          const value = await rss(pids[server]).catch(() => 0);
          peak[server] = Math.max(peak[server], value);
        }
      }, 1_000);

      let errorCount = 0;
      const errors: string[] = [];
      const fail = (what: string) => {
        errorCount++;
        if (errors.length < 20) errors.push(what);
      };
      const downloadMs: number[] = [];
      const uploadMs: number[] = [];
      const started = Date.now();
      const deadline = started + SOAK_SECONDS * 1000;

      const downloader = async () => {
        while (Date.now() < deadline) {
          const t0 = performance.now();
          try {
            const mint = await owner.fetch(`/api/files/${fileId}/download-token`, { method: 'POST' });
            if (mint.status !== 201) {
              fail(`mint: ${mint.status} ${await mint.text()}`);
              continue;
            }
            const { url } = (await mint.json()) as { url: string };
            const response = await fetch(url);
            const bytes = new Uint8Array(await response.arrayBuffer());
            if (response.status !== 200)
              fail(`download: ${response.status} ${Buffer.from(bytes).toString()}`);
            else if (bytes.length !== DOWNLOAD_SIZE || sha256(bytes) !== servedHash)
              fail(`download: ${bytes.length} bytes, wrong content`);
            else downloadMs.push(performance.now() - t0);
          } catch (error) {
            fail(`download: ${(error as Error).message} ${(error as Error).cause ?? ''}`);
          }
        }
      };
      const uploader = async (i: number) => {
        const client = uploaders[i % UPLOAD_USERS] as SignedInClient;
        const content = randomBytes(UPLOAD_SIZE);
        const hash = sha256(content);
        let n = 0;
        while (Date.now() < deadline) {
          const t0 = performance.now();
          try {
            const response = await upload(client, content, `soak-${i}-${n++}.bin`);
            const text = await response.text();
            if (response.status !== 201) fail(`upload: ${response.status} ${text}`);
            else if ((JSON.parse(text) as { file: { sha256: string } }).file.sha256 !== hash)
              fail('upload: wrong sha256');
            else uploadMs.push(performance.now() - t0);
          } catch (error) {
            fail(`upload: ${(error as Error).message} ${(error as Error).cause ?? ''}`);
          }
        }
      };

      await Promise.all([
        ...Array.from({ length: DOWNLOADERS }, downloader),
        ...Array.from({ length: UPLOADERS }, (_, i) => uploader(i)),
      ]);
      const seconds = (Date.now() - started) / 1000;
      clearInterval(sampler);
      for (const server of ['a', 'b'] as const)
        peak[server] = Math.max(peak[server], await rss(pids[server]));
      await sleep(500);
      const leftovers = await readdir(join(storageDir, '.tmp')).catch(() => [] as string[]);

      downloadMs.sort((x, y) => x - y);
      uploadMs.sort((x, y) => x - y);
      const ms = (value: number) => `${Math.round(value)} ms`;
      const table = [
        `Soak: ${SOAK_SECONDS} s, A on ${database}, ${DOWNLOADERS} concurrent downloaders, ${UPLOADERS} concurrent uploaders`,
        '',
        '| measure | value |',
        '|---|---|',
        `| downloads (${DOWNLOAD_SIZE / KIB} KiB, fresh token from A each) | ${downloadMs.length} (${(downloadMs.length / seconds).toFixed(1)}/s, ${((downloadMs.length * DOWNLOAD_SIZE) / MIB / seconds).toFixed(1)} MiB/s) |`,
        `| download latency p50 / p99 (mint + GET) | ${ms(percentile(downloadMs, 50))} / ${ms(percentile(downloadMs, 99))} |`,
        `| uploads (${UPLOAD_SIZE / KIB} KiB) | ${uploadMs.length} (${(uploadMs.length / seconds).toFixed(1)}/s) |`,
        `| upload latency p50 / p99 | ${ms(percentile(uploadMs, 50))} / ${ms(percentile(uploadMs, 99))} |`,
        `| errors | ${errorCount} |`,
        `| A RSS at start → peak (bound) | ${mib(startRss.a)} → ${mib(peak.a)} (${mib(limit.a)}) |`,
        `| B RSS at start → peak (bound) | ${mib(startRss.b)} → ${mib(peak.b)} (${mib(limit.b)}) |`,
      ].join('\n');
      console.log(table);

      expect(errors, `${errorCount} errors`).toEqual([]);
      expect(downloadMs.length).toBeGreaterThan(0);
      expect(uploadMs.length).toBeGreaterThan(0);
      expect(peak.a).toBeLessThan(limit.a);
      expect(peak.b).toBeLessThan(limit.b);
      expect(leftovers).toEqual([]);
      expect(a.child.exitCode).toBeNull();
      expect(b.child.exitCode).toBeNull();
    });
  },
);
