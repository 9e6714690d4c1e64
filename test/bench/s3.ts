/**
 * `npm run bench:s3`: B on S3 storage (infra/s3-local.sh must run) against the bucket itself.
 *
 * - Large file: B streaming a 256 MiB object from the bucket (a fresh token per run, with curl)
 *   against curl fetching the same object with a presigned GetObject URL, straight from the store.
 * - Small files: 4 KiB downloads through B, a fresh token each, 16 at a time, against presigned
 *   GETs of the same object at the same concurrency.
 *
 * Swift is Python: its own throughput is the ceiling here; B's ratio to it is the figure.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { GetObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { S3Store } from '@sfh/storage/s3';
import { startB } from '../support/download-server-alone.ts';
import { buildDownloadServer } from '../support/processes.ts';
import { freshPrefix, S3_AVAILABLE, S3_BUCKET, s3Env, s3StoreOptions } from '../support/s3.ts';
import { MIB, stat } from './lib.ts';

const run = promisify(execFile);
const LARGE = 256 * MIB;
const RUNS = 3;
const SMALL_REQUESTS = 400;
const CONCURRENCY = 16;

if (!S3_AVAILABLE) {
  console.error('No S3 store answers: run infra/s3-local.sh start first');
  process.exit(1);
}

/** Seconds curl took to download `url` to /dev/null, and the bytes it got. */
async function curl(url: string): Promise<{ seconds: number; bytes: number }> {
  const { stdout } = await run('curl', [
    '-s',
    '-f',
    '-o',
    '/dev/null',
    '-w',
    '%{time_total} %{size_download}',
    url,
  ]);
  const [seconds, bytes] = stdout.split(' ').map(Number);
  return { seconds: seconds as number, bytes: bytes as number };
}

/** Requests per second for `count` GETs of `urls()` at `concurrency`. */
async function throughput(count: number, concurrency: number, url: () => Promise<string>): Promise<number> {
  let next = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next++ < count) {
        const response = await fetch(await url());
        await response.arrayBuffer();
        if (response.status !== 200) throw new Error(`GET: ${response.status}`);
      }
    }),
  );
  return count / ((performance.now() - started) / 1000);
}

buildDownloadServer();
const prefix = freshPrefix();
const writer = new S3Store(s3StoreOptions(prefix));
const b = await startB({ ...s3Env(prefix, 'reader'), LOG_LEVEL: 'warn' });
const presigner = new S3Client({ ...s3StoreOptions(prefix).client, forcePathStyle: true });
const presign = (id: string) =>
  getSignedUrl(presigner, new GetObjectCommand({ Bucket: S3_BUCKET, Key: `${prefix}${id}` }), {
    expiresIn: 600,
  });

const claimsOf = async (bytes: Buffer) => {
  const stored = await writer.put(
    Readable.from(
      (function* () {
        for (let at = 0; at < bytes.length; at += MIB) yield bytes.subarray(at, at + MIB);
      })(),
    ),
  );
  return {
    fid: 'bench',
    obj: stored.id,
    name: 'f.bin',
    ctype: 'application/octet-stream',
    size: stored.size,
    sha256: stored.sha256,
  };
};
const large = await claimsOf(randomBytes(LARGE));
const small = await claimsOf(randomBytes(4 * 1024));

try {
  const viaB: number[] = [];
  const direct: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const fromB = await curl(b.url(await b.mint(large)));
    const fromStore = await curl(await presign(large.obj));
    if (fromB.bytes !== LARGE || fromStore.bytes !== LARGE) throw new Error('short download');
    viaB.push(LARGE / MIB / fromB.seconds);
    direct.push(LARGE / MIB / fromStore.seconds);
  }
  const bLarge = stat(viaB);
  const storeLarge = stat(direct);

  const smallUrl = await presign(small.obj);
  const bSmall = await throughput(SMALL_REQUESTS, CONCURRENCY, async () => b.url(await b.mint(small)));
  const storeSmall = await throughput(SMALL_REQUESTS, CONCURRENCY, async () => smallUrl);

  console.log('| S3 storage (infra/s3-local.sh, Swift s3api) | B | presigned GetObject | B / direct |');
  console.log('|---|---|---|---|');
  console.log(
    `| 256 MiB, curl, median of ${RUNS} | ${bLarge.median.toFixed(0)} MiB/s | ${storeLarge.median.toFixed(0)} MiB/s | ${(bLarge.median / storeLarge.median).toFixed(2)} |`,
  );
  console.log(
    `| 4 KiB, ${SMALL_REQUESTS} GETs, ${CONCURRENCY} at a time | ${bSmall.toFixed(0)} req/s | ${storeSmall.toFixed(0)} req/s | ${(bSmall / storeSmall).toFixed(2)} |`,
  );
} finally {
  await b.stop();
  await Promise.all([writer.delete(large.obj), writer.delete(small.obj)]).catch(() => {});
  await writer.close();
  presigner.destroy();
}
