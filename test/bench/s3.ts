/**
 * B on S3 storage (infra/s3-local.sh) against the bucket itself: the S3 part of `npm run bench`
 * (`BENCH_ONLY=...,s3`; skipped, saying so, when no S3 store answers), and `npm run bench:s3` alone.
 *
 * - Large file: curl downloading one 256 MiB object through B (a fresh token per run) against curl
 *   fetching the same object with a presigned GetObject URL, straight from the store. Target: B at
 *   least 0.9 of the direct rate. Beside them, the same presigned URL through nginx in B's seat (a
 *   plain reverse proxy in C, reading 64 KiB at a time as Node does; left out when nginx is not
 *   installed): what one more process copying the bytes costs at the least, on this machine.
 * - Small files: 4 KiB downloads through B (a token minted beforehand for each), 16 at a time,
 *   against presigned GETs of the same object at the same concurrency.
 *
 * Fair by construction: the same object, the same pinning for every side, a warm-up of each (B's
 * is three downloads: its JIT and GC take that long to settle), then BENCH_RUNS runs (default 5)
 * rotating which side goes first; median and min–max. The store (Swift's proxy and object server)
 * has core 0 to itself, and whatever downloads from it (B or nginx, and curl) has core 1: the
 * store on a machine of its own, as it is in any deployment, and the same store for every side.
 * Swift is Python and would take ~1.4 of the 2 cores if it could; sharing its cores with a relay
 * makes the ratio measure the CPU the store loses to the relay (nginx there: 0.83–0.93), not what
 * the relay costs. The CPU each process used during the runs is printed as well.
 */
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { GetObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import type { FileClaims } from '@sfh/download-token';
import { S3Store } from '@sfh/storage/s3';
import { NGINX_BINARY } from '../support/nginx.ts';
import { buildDownloadServer, freePort } from '../support/processes.ts';
import { freshPrefix, S3_AVAILABLE, S3_BUCKET, S3_HOST, s3Env, s3StoreOptions } from '../support/s3.ts';
import { signingKey } from '../support/signing-key.ts';
import { mintOne, startB } from './fixtures.ts';
import {
  cpuSecondsOf,
  KIB,
  MIB,
  type Pinning,
  pinLoadGenerator,
  type Stat,
  startProcess,
  stat,
} from './lib.ts';

const run = promisify(execFile);
const LARGE = 256 * MIB;
const SMALL = 4 * KIB;
const RUNS = Number(process.env.BENCH_RUNS ?? (process.env.BENCH_QUICK === '1' ? 1 : 5));
const SMALL_REQUESTS = 400;
const CONCURRENCY = 16;
const TARGET = 0.9;
/** Unmeasured downloads through B first: a fresh B's first ones cost it up to twice the CPU. */
const B_WARM_UP = 3;
/** Where infra/s3-local.sh keeps each service's pid (its session: a service and its workers). */
const SWIFT_RUN_DIR = join(process.env.S3_LOCAL_DIR ?? '/var/lib/sfh-s3', 'run');

const log = (message: string) => process.stderr.write(`[bench s3] ${message}\n`);

/** The pids of a Swift service started by infra/s3-local.sh (every process of its session). */
function swiftPids(service: 'proxy' | 'object'): number[] {
  let session: number;
  try {
    session = Number(readFileSync(join(SWIFT_RUN_DIR, `${service}.pid`), 'utf8'));
  } catch {
    return [];
  }
  return readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .filter((pid) => {
      try {
        const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
        return Number(text.slice(text.lastIndexOf(')') + 2).split(' ')[3]) === session;
      } catch {
        return false;
      }
    })
    .map(Number);
}

const cpuOf = (pids: number[]) => pids.reduce((sum, pid) => sum + (cpuSecondsOf(pid) ?? 0), 0);
const affinityOf = (pid: number) =>
  execFileSync('taskset', ['-c', '-p', String(pid)], { encoding: 'utf8' })
    .trim()
    .split(': ')[1] as string;
const pin = (pid: number, cpu: string) =>
  execFileSync('taskset', ['-a', '-c', '-p', cpu, String(pid)], { stdio: 'ignore' });

/** Pins `pids` to `cpu` until the returned function puts each back where it was. */
function pinFor(pids: number[], cpu: string | undefined): () => void {
  if (cpu === undefined) return () => {};
  const before = pids.map((pid) => [pid, affinityOf(pid)] as const);
  for (const pid of pids) pin(pid, cpu);
  return () => {
    for (const [pid, cpus] of before) {
      try {
        pin(pid, cpus);
      } catch {
        // Gone meanwhile.
      }
    }
  };
}

/** Seconds curl (on `cpu`) took to download `url` to /dev/null; throws unless it got `bytes`. */
async function curl(url: string, bytes: number, cpu: string | undefined): Promise<number> {
  const args = ['-s', '-f', '-o', '/dev/null', '-w', '%{time_total} %{size_download}', url];
  const { stdout } = cpu ? await run('taskset', ['-c', cpu, 'curl', ...args]) : await run('curl', args);
  const [seconds, size] = stdout.split(' ').map(Number);
  if (size !== bytes) throw new Error(`curl got ${size} of ${bytes} bytes`);
  return seconds as number;
}

/** Requests per second for one GET of each of `urls`, `concurrency` at a time (this process). */
async function throughput(urls: string[], concurrency: number): Promise<number> {
  let next = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      for (let url = urls[next++]; url !== undefined; url = urls[next++]) {
        const response = await fetch(url);
        await response.arrayBuffer();
        if (response.status !== 200) throw new Error(`GET: ${response.status}`);
      }
    }),
  );
  return urls.length / ((performance.now() - started) / 1000);
}

/**
 * nginx (one worker, on `cpu`) proxying every request to the store, Host header kept so presigned
 * URLs still match their signature. Buffers of 64 KiB, the size of Node's socket reads; nothing
 * spooled to disk. Undefined when nginx is not installed.
 */
async function startNginx(dir: string, cpu: string | undefined) {
  if (!NGINX_BINARY) return undefined;
  const port = await freePort();
  const conf = join(dir, 'nginx.conf');
  writeFileSync(
    conf,
    `daemon off; worker_processes 1; pid ${dir}/nginx.pid; error_log stderr;
events {}
http {
  access_log off; proxy_temp_path ${dir}/nginx-tmp;
  upstream store { server ${S3_HOST}; keepalive 4; }
  server {
    listen 127.0.0.1:${port};
    location = /ready { return 200; }
    location / {
      proxy_pass http://store; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host ${S3_HOST};
      proxy_buffering on; proxy_max_temp_file_size 0;
      proxy_buffer_size 64k; proxy_buffers 8 64k; proxy_busy_buffers_size 128k;
    }
  }
}
`,
  );
  const origin = `http://127.0.0.1:${port}`;
  const server = await startProcess({
    entry: 'nginx',
    command: [NGINX_BINARY, '-c', conf, '-p', dir],
    env: {},
    readyUrl: `${origin}/ready`,
    cpu,
  });
  // The master and its one worker, which nginx has started by the time it answers.
  const worker = execFileSync('pgrep', ['-P', String(server.pid)], { encoding: 'utf8' }).trim();
  return { server, origin, pids: [server.pid, ...worker.split('\n').map(Number)] };
}

const range = (s: Stat, digits = 0) =>
  `${s.median.toFixed(digits)} (${s.min.toFixed(digits)}–${s.max.toFixed(digits)})`;

/**
 * Runs the S3 benchmark and prints its table (stdout). Resolves `false`, having printed why,
 * when no S3 store answers.
 */
export async function s3Bench(pinning: Pinning): Promise<boolean> {
  if (!S3_AVAILABLE) {
    console.log(
      'S3 storage: skipped: no S3 store answers (start one with `infra/s3-local.sh start`, then `npm run bench:s3`)',
    );
    return false;
  }
  // The store in the servers' seat; B (or nginx), curl and this process in the load generator's.
  const storeCpu = pinning.serverCpu;
  const downloadCpu = pinning.loadCpu;
  const placement = storeCpu
    ? `the store (Swift's proxy and object server) on core ${storeCpu}; B, curl and the small-file client on core ${downloadCpu}`
    : pinning.note;
  log(`pinning: ${placement}`);
  const dir = await mkdtemp(join(tmpdir(), 'sfh-bench-s3-'));
  const prefix = freshPrefix();
  const writer = new S3Store(s3StoreOptions(prefix));
  const presigner = new S3Client({ ...s3StoreOptions(prefix).client, forcePathStyle: true });
  const key = await signingKey(dir);
  const proxy = swiftPids('proxy');
  const object = swiftPids('object');
  const unpin = pinFor([...proxy, ...object], storeCpu);
  if (storeCpu && (proxy.length === 0 || object.length === 0))
    log(`Swift's processes not found in ${SWIFT_RUN_DIR}: the store is not pinned`);
  const b = await startB({
    dir,
    storageDir: join(dir, 'unused'),
    jwksFile: key.jwksFile,
    cpu: downloadCpu,
    env: { ...s3Env(prefix, 'reader'), LOG_LEVEL: 'warn' },
  });
  const put = async (bytes: Buffer): Promise<FileClaims> => {
    const stored = await writer.put(
      Readable.from(
        (function* () {
          for (let at = 0; at < bytes.length; at += MIB) yield bytes.subarray(at, at + MIB);
        })(),
      ),
    );
    const { id: obj, size, sha256 } = stored;
    return { fid: 'bench', obj, name: 'f.bin', ctype: 'application/octet-stream', size, sha256 };
  };
  const presign = (file: FileClaims) =>
    getSignedUrl(presigner, new GetObjectCommand({ Bucket: S3_BUCKET, Key: `${prefix}${file.obj}` }), {
      expiresIn: 3600,
    });
  const viaB = async (file: FileClaims) => `${b.origin}/d/${await mintOne(key, b.origin, file)}`;
  const large = await put(randomBytes(LARGE));
  const small = await put(randomBytes(SMALL));
  const nginx = await startNginx(dir, downloadCpu);
  if (!nginx) log('nginx is not installed: no reverse-proxy reference');
  const viaNginx = async (file: FileClaims) => {
    const url = new URL(await presign(file));
    return `${nginx?.origin}${url.pathname}${url.search}`;
  };
  try {
    type Side = 'direct' | 'b' | 'nginx';
    const sides: Side[] = nginx ? ['direct', 'b', 'nginx'] : ['direct', 'b'];
    log(`large: ${LARGE / MIB} MiB, a warm-up and ${RUNS} runs of each of ${sides.join(', ')}`);
    const rates: Record<Side, number[]> = { direct: [], b: [], nginx: [] };
    /** CPU, as a share of one core, of each process during each side's runs. */
    const cpu: Record<Side, Record<'proxy' | 'object' | 'relay', number[]>> = {
      direct: { proxy: [], object: [], relay: [] },
      b: { proxy: [], object: [], relay: [] },
      nginx: { proxy: [], object: [], relay: [] },
    };
    /** The process between curl and the store, for each side. */
    const relay: Record<Side, number[]> = { direct: [], b: [b.server.pid], nginx: nginx?.pids ?? [] };
    const once = async (side: Side, measured: boolean) => {
      const url =
        side === 'b' ? await viaB(large) : side === 'nginx' ? await viaNginx(large) : await presign(large);
      const before = [cpuOf(proxy), cpuOf(object), cpuOf(relay[side])];
      const seconds = await curl(url, LARGE, downloadCpu);
      const after = [cpuOf(proxy), cpuOf(object), cpuOf(relay[side])];
      if (!measured) return;
      rates[side].push(LARGE / MIB / seconds);
      (['proxy', 'object', 'relay'] as const).forEach((name, i) => {
        cpu[side][name].push(((after[i] as number) - (before[i] as number)) / seconds);
      });
    };
    for (const side of sides) {
      for (let i = 0; i < (side === 'b' ? B_WARM_UP : 1); i++) await once(side, false);
    }
    for (let i = 0; i < RUNS; i++) {
      for (let j = 0; j < sides.length; j++) await once(sides[(i + j) % sides.length] as Side, true);
    }
    const largeStats = {
      direct: stat(rates.direct),
      b: stat(rates.b),
      nginx: nginx ? stat(rates.nginx) : undefined,
    };
    const ratio = largeStats.b.median / largeStats.direct.median;

    log(`small: ${SMALL_REQUESTS} GETs of ${SMALL / KIB} KiB, ${CONCURRENCY} at a time, ${RUNS} runs`);
    const smallRates = { b: [] as number[], direct: [] as number[] };
    const smallUrl = await presign(small);
    await throughput(Array(CONCURRENCY * 4).fill(smallUrl), CONCURRENCY);
    for (let i = 0; i < RUNS; i++) {
      const tokens = await Promise.all(Array.from({ length: SMALL_REQUESTS }, () => viaB(small)));
      smallRates.b.push(await throughput(tokens, CONCURRENCY));
      smallRates.direct.push(await throughput(Array(SMALL_REQUESTS).fill(smallUrl), CONCURRENCY));
    }
    const bSmall = stat(smallRates.b);
    const directSmall = stat(smallRates.direct);

    const share = (side: Side, name: 'proxy' | 'object' | 'relay') => stat(cpu[side][name]).median.toFixed(2);
    console.log(
      `\nS3 storage (infra/s3-local.sh: OpenStack Swift's s3api, one node), median of ${RUNS} (min–max); ${placement}\n`,
    );
    console.log(
      '| figure | through B | presigned GetObject | B / direct | through nginx (reference) | nginx / direct |',
    );
    console.log('|---|---|---|---|---|---|');
    const reference = largeStats.nginx
      ? `${range(largeStats.nginx)} MiB/s | ${(largeStats.nginx.median / largeStats.direct.median).toFixed(2)}`
      : 'not installed | –';
    console.log(
      `| ${LARGE / MIB} MiB, curl | ${range(largeStats.b)} MiB/s | ${range(largeStats.direct)} MiB/s | ${ratio.toFixed(2)} | ${reference} |`,
    );
    console.log(
      `| ${SMALL / KIB} KiB, ${SMALL_REQUESTS} GETs, ${CONCURRENCY} at a time | ${range(bSmall)} req/s | ${range(directSmall)} req/s | ${(bSmall.median / directSmall.median).toFixed(2)} | – | – |`,
    );
    const through = (side: Side, name: string) =>
      `Swift proxy ${share(side, 'proxy')}, object server ${share(side, 'object')}, ${name} ${share(side, 'relay')}`;
    console.log(
      `\nCPU during the ${LARGE / MIB} MiB downloads (share of one core, median): direct: Swift proxy ${share('direct', 'proxy')}, object server ${share('direct', 'object')}; through B: ${through('b', 'B')}${nginx ? `; through nginx: ${through('nginx', 'nginx')}` : ''}`,
    );
    console.log(
      `Target: B ≥ ${TARGET} of the direct GetObject for the large file: ${ratio >= TARGET ? 'met' : 'MISSED'} (${ratio.toFixed(3)})`,
    );
    return true;
  } finally {
    await nginx?.server.stop();
    await b.server.stop();
    unpin();
    await Promise.all([writer.delete(large.obj), writer.delete(small.obj)]).catch(() => {});
    await writer.close();
    presigner.destroy();
    await rm(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  buildDownloadServer();
  if (!(await s3Bench(pinLoadGenerator()))) process.exitCode = 1;
}
