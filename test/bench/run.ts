/**
 * `npm run bench`: every figure of B, A and the algorithm side by side in one run, with its baselines.
 *
 * 0. The algorithm: jose's jwtVerify (and SignJWT) for ES256 and EdDSA, pinned to B's core and
 *    unpinned, one at a time and 32 in flight, against node:crypto's raw verify.
 * 1. Small files (4 KiB): plain node:http answering as a file server does (Content-Length, exactly
 *    the file's bytes; streaming without the end, and chunked, as extra rows), @fastify/static,
 *    the token's verify rates on B's core (raw node:crypto, jose's jwtVerify,
 *    verifyDownloadToken), B with the memory store and with Redis (a fresh single-use token per
 *    request). B as a fraction of the jose limit 1 / (1/node_http + 1/jose_verify), beside the
 *    physical one 1 / (1/node_http + 1/raw_verify); the same unpinned.
 * 2. Large files (1 GiB): throughput of B, node:http and @fastify/static; B's peak RSS with 8
 *    concurrent downloads at full speed and with 8 slow readers.
 * 3. Minting: POST /api/files/:id/download-token on Postgres and on PGlite, against raw signs.
 * 4. End to end: click on A's /files/:id/download → first byte from B (median, p99).
 *
 * Servers run as their own processes pinned to core 0, this process (the load generator) to
 * core 1. Each figure is measured `runs` times after a warm-up: median and min–max.
 * `BENCH_QUICK=1`: one short run of everything (a smoke test). Other knobs: BENCH_RUNS,
 * BENCH_DURATION (seconds), BENCH_CONNECTIONS, BENCH_LARGE_MIB, BENCH_ONLY=alg,small,large,mint,e2e,s3
 * (s3: B on S3 storage against a presigned GetObject, test/bench/s3.ts; skipped when no S3 store answers),
 * BENCH_B_LOG_LEVEL (B's LOG_LEVEL; default info, as deployed: one line per request),
 * BENCH_NODE24 (a second node binary: the small and large sections run again with B, node:http
 * and jose on it), TEST_DATABASE_URL, REDIS_URL.
 */
import { execFile, execFileSync } from 'node:child_process';
import { cp, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { Agent, request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { type FileClaims, TOKEN_ALGORITHM, TOKEN_ALGORITHMS, type TokenAlgorithm } from '@sfh/download-token';
import { Redis } from 'ioredis';
import { nanoid } from 'nanoid';
import pg from 'pg';
import { createTestDatabase } from '../support/database.ts';
import { APP_SERVER, buildDownloadServer, DOWNLOAD_SERVER, freePort } from '../support/processes.ts';
import { signingKey } from '../support/signing-key.ts';
import {
  type BProcess,
  MINTING_USERS,
  mintingUsers,
  mintMany,
  mintOne,
  putLargeFile,
  putSmallFile,
  startB,
  startBaseline,
} from './fixtures.ts';
import {
  benchRedis,
  type CpuShare,
  deleteKeys,
  download,
  GIB,
  KIB,
  type LoadOptions,
  type LoadResult,
  load,
  MIB,
  machine,
  peakRss,
  percentile,
  pinLoadGenerator,
  ROOT,
  resultsFolder,
  rssOf,
  type Server,
  type Stat,
  sleep,
  startProcess,
  stat,
  stopAll,
  withCpu,
} from './lib.ts';

const env = process.env;
const execFileAsync = promisify(execFile);
const int = (value: string | undefined, fallback: number) => (value ? Number.parseInt(value, 10) : fallback);
const QUICK = env.BENCH_QUICK === '1';
const config = {
  quick: QUICK,
  runs: int(env.BENCH_RUNS, QUICK ? 1 : 3),
  durationS: int(env.BENCH_DURATION, QUICK ? 2 : 5),
  warmupS: QUICK ? 1 : 2,
  connections: int(env.BENCH_CONNECTIONS, 16),
  smallBytes: 4 * KIB,
  largeBytes: int(env.BENCH_LARGE_MIB, QUICK ? 256 : 1024) * MIB,
  /** Concurrent downloads of the large file in a throughput run. */
  downloads: 3,
  /** Concurrent downloads while B's peak RSS is watched. */
  rssDownloads: 8,
  slowBytesPerSecond: MIB,
  slowSeconds: QUICK ? 2 : 10,
  clicks: QUICK ? 50 : 500,
  mintProcesses: Math.max(2, Math.min(availableParallelism(), 4)),
  redisUrl: env.REDIS_URL ?? 'redis://127.0.0.1:6379',
  databaseUrl: env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test',
  only: env.BENCH_ONLY ? env.BENCH_ONLY.split(',') : ['alg', 'small', 'large', 'mint', 'e2e', 's3'],
};

/**
 * The Node binaries B is measured on: the one running the bench, and with BENCH_NODE24 (the path
 * of another node binary, e.g. from `npm install --prefix DIR node@24`) that one too, in the
 * same run. Its rows carry its version; its limit comes from its own node:http and jose rates.
 */
interface Runtime {
  /** Appended to the figures' names (empty for the bench's own node). */
  label: string;
  /** Appended to the result keys. */
  suffix: string;
  node?: string;
  version: string;
}
const runtimes: Runtime[] = [{ label: '', suffix: '', version: process.version }];
if (env.BENCH_NODE24) {
  const version = execFileSync(env.BENCH_NODE24, ['--version'], { encoding: 'utf8' }).trim();
  const major = version.replace(/^v/, '').split('.')[0];
  runtimes.push({ label: `, Node ${major}`, suffix: `.node${major}`, node: env.BENCH_NODE24, version });
}
const TARGETS = { limitFraction: 0.85, redisCost: 0.1, largeFraction: 0.9, rssBytes: 128e6, mintRate: 2000 };

const log = (message: string) =>
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);

// ---------------------------------------------------------------------------------------------
// Results

interface Row {
  section: string;
  key: string;
  figure: string;
  unit: string;
  stat: Stat;
  note?: string;
  /** Reasons runs were discarded. */
  invalid?: string[];
}
const rows: Row[] = [];
const results: Record<string, number> = {};
const r = (key: string) => results[key] ?? Number.NaN;

function record(
  section: string,
  key: string,
  figure: string,
  unit: string,
  values: number[],
  extra: { note?: string; invalid?: string[] } = {},
): Stat {
  const s = stat(values);
  rows.push({
    section,
    key,
    figure,
    unit,
    stat: s,
    ...(extra.note ? { note: extra.note } : {}),
    ...(extra.invalid?.length ? { invalid: extra.invalid } : {}),
  });
  results[key] = s.median;
  const spread = values.length > 1 ? ` (${fmt(s.min, unit)}–${fmt(s.max, unit)})` : '';
  log(
    `${figure}: ${fmt(s.median, unit)} ${unit}${spread}${extra.invalid?.length ? ` [${extra.invalid.join('; ')}]` : ''}`,
  );
  return s;
}

/** A derived figure (ratios): a single value, no runs of its own. */
const derive = (section: string, key: string, figure: string, unit: string, value: number, note?: string) =>
  record(section, key, figure, unit, Number.isFinite(value) ? [value] : [], note ? { note } : {});

function fmt(value: number, unit: string): string {
  if (!Number.isFinite(value)) return 'n/a';
  if (unit === 'fraction') return value.toFixed(2);
  if (unit === '%') return `${(value * 100).toFixed(1)}`;
  if (unit === 'GB/s') return value.toFixed(2);
  if (unit === 'MB') return (value / 1e6).toFixed(1);
  if (unit === 'ms') return value < 10 ? value.toFixed(2) : value.toFixed(1);
  return Math.round(value).toLocaleString('en-US');
}

/** Measures `once` after `warmups` unrecorded runs, `config.runs` times; discards invalid runs. */
interface Once {
  value: number;
  invalid?: string | undefined;
  cpu?: CpuShare;
  /** The server's CPU time per request (µs), all its threads: steadier than a rate on a shared machine. */
  perRequestUs?: number;
}

async function repeat(
  label: string,
  once: (run: number) => Promise<Once>,
  warmups = 1,
): Promise<{
  values: number[];
  invalid: string[];
  note: string | undefined;
  perRequestUs: number | undefined;
}> {
  for (let i = 0; i < warmups; i++) {
    const warm = await once(-1);
    log(`${label}: warm-up ${warm.value.toFixed(1)}${warm.invalid ? ` (${warm.invalid})` : ''}`);
  }
  const values: number[] = [];
  const invalid: string[] = [];
  const server: number[] = [];
  const client: number[] = [];
  const perRequest: number[] = [];
  for (let run = 0; run < config.runs; run++) {
    const result = await once(run);
    if (result.invalid) invalid.push(`run ${run + 1}: ${result.invalid}`);
    else values.push(result.value);
    if (result.cpu?.server !== undefined) server.push(result.cpu.server);
    if (result.perRequestUs !== undefined && !result.invalid) perRequest.push(result.perRequestUs);
    if (result.cpu) client.push(result.cpu.client);
  }
  // Near 100% for the server: it was the limit. Well below, with the load generator near 100%:
  // the load generator was.
  const pct = (xs: number[]) => `${Math.round(stat(xs).median * 100)}%`;
  const cost = perRequest.length
    ? `, ${Math.round(stat(perRequest).median)} µs of server CPU per request`
    : '';
  const note = client.length
    ? `CPU: ${server.length ? `server ${pct(server)}, ` : ''}load generator ${pct(client)}${cost}`
    : undefined;
  return { values, invalid, note, perRequestUs: perRequest.length ? stat(perRequest).median : undefined };
}

const loadValue = ({ result, cpu }: { result: LoadResult; cpu: CpuShare }): Once => ({
  value: result.rate,
  invalid: result.invalid,
  cpu,
  ...(cpu.server !== undefined && result.rate > 0 ? { perRequestUs: (cpu.server / result.rate) * 1e6 } : {}),
});

// ---------------------------------------------------------------------------------------------
// Setup

// The machine first: once pinned, this process sees a single core.
const host = machine();
const pinning = pinLoadGenerator();
const cpu = pinning.serverCpu;
buildDownloadServer();
const startedAt = new Date();
const dir = await mkdtemp(join(tmpdir(), 'sfh-bench-'));
const storageDir = join(dir, 'objects');
const staticDir = join(dir, 'static');
await mkdir(storageDir, { recursive: true });
await mkdir(staticDir, { recursive: true });

let cleaningUp = false;
async function cleanUp() {
  if (cleaningUp) return;
  cleaningUp = true;
  await stopAll();
  await rm(dir, { recursive: true, force: true });
}
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    void cleanUp().finally(() => process.exit(130));
  });
}

log(
  `machine: ${host.cpu}, ${host.cores} cores, ${host.memoryGiB} GiB, Node ${host.node}; load ${host.loadAverage}`,
);
log(`pinning: ${pinning.note}`);
const busy = Number(host.loadAverage.split(' ')[0]) >= 1.5;
if (busy)
  log('WARNING: load average ≥ 1.5 at the start: other work is running, the figures are not representative');

const key = await signingKey(dir);
const smallFile = await putSmallFile(
  storageDir,
  staticDir,
  'small.bin',
  Buffer.alloc(config.smallBytes, 'x'),
);
const notes: string[] = [];
/** The large file, written once for every runtime's large-file section. */
let largeFile: FileClaims | undefined;

try {
  const needBaselines = config.only.includes('small') || config.only.includes('large');
  const baselines = needBaselines
    ? {
        http: await startBaseline('http', staticDir, cpu),
        static: await startBaseline('static', staticDir, cpu),
      }
    : undefined;

  if (config.only.includes('alg')) await guarded('algorithms', algorithms);
  for (const runtime of runtimes)
    if (config.only.includes('small') && baselines)
      await guarded(`small files${runtime.label}`, () => smallFiles(baselines, runtime));
  if (config.only.includes('small')) await guarded('small files, unpinned', smallUnpinned);
  for (const runtime of runtimes)
    if (config.only.includes('large') && baselines)
      await guarded(`large files${runtime.label}`, () => largeFiles(baselines, runtime));
  await baselines?.http.server.stop();
  await baselines?.static.server.stop();
  if (config.only.includes('mint') || config.only.includes('e2e')) await guarded('minting', minting);
  // Its own table, pinning and clean-up (test/bench/s3.ts); loaded only when asked for.
  if (config.only.includes('s3'))
    await guarded('S3 storage', async () => {
      await (await import('./s3.ts')).s3Bench(pinning);
    });
} finally {
  await cleanUp();
}

await report();

/** A section that fails is reported (and fails the command) without losing the others. */
async function guarded(name: string, section: () => Promise<void>) {
  try {
    await section();
  } catch (error) {
    process.exitCode = 1;
    notes.push(`${name} failed: ${error instanceof Error ? error.message : error}`);
    // Its servers, if any are left, stop with the others at the end.
    log(`${name} FAILED: ${error instanceof Error ? error.stack : error}`);
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Small files

async function smallFiles(baselines: Record<'http' | 'static', BProcess>, runtime: Runtime) {
  const section = 'small';
  const k = (name: string) => `small.${name}${runtime.suffix}`;
  const on = runtime.label;
  const small = (server: BProcess, durationS: number, query = '') =>
    withCpu(server.server.pid, () =>
      load({ url: `${server.origin}/small.bin${query}`, connections: config.connections, durationS }),
    );
  const baseline = async (server: BProcess, key: string, figure: string, query: string, what: string) => {
    log(`small files: ${figure}`);
    const measured = await repeat(figure, (run) =>
      small(server, run < 0 ? config.warmupS : config.durationS, query).then(loadValue),
    );
    record(section, key, figure, 'r/s', measured.values, {
      invalid: measured.invalid,
      note: `${what}; ${measured.note}`,
    });
    if (measured.perRequestUs !== undefined) results[`${key}.cpu_us`] = measured.perRequestUs;
  };

  // The reference: what a file server does (size known, Content-Length, exactly the file's bytes).
  const http = runtime.node ? await startBaseline('http', staticDir, cpu, runtime.node) : baselines.http;
  try {
    await baseline(
      http,
      k('node_http'),
      `node:http, 4 KiB${on}`,
      '',
      'the reference: Content-Length, createReadStream(file, { end }) reads exactly the file',
    );
  } finally {
    if (http !== baselines.http) await http.server.stop();
  }
  if (!runtime.node) {
    await baseline(
      baselines.http,
      k('node_http_pipe'),
      'extra: node:http, 4 KiB, end not passed',
      '?pipe',
      'not a reference: createReadStream(file).pipe(res), a 64 KiB buffer and one more read to find the end',
    );
    await baseline(
      baselines.http,
      k('node_http_chunked'),
      'extra: node:http, 4 KiB, chunked',
      '?chunked',
      'not a reference: no Content-Length (no file server answers a file so), end not passed',
    );
    await baseline(baselines.static, k('fastify_static'), '@fastify/static, 4 KiB', '', 'fastify, no logger');
  }

  log(`small files: ${TOKEN_ALGORITHM} verify rates on B's core, one at a time${on}`);
  for (const [mode, figure] of [
    ['raw', `raw ${TOKEN_ALGORITHM} verify (node:crypto)`],
    ['jose', `jose jwtVerify, ${TOKEN_ALGORITHM}`],
    ['ours', `verifyDownloadToken (jose + syntax and file claims), ${TOKEN_ALGORITHM}`],
  ] as const) {
    const costs: number[] = [];
    const rates = await repeat(
      figure,
      async () => {
        const measured = await cryptoCost(TOKEN_ALGORITHM, mode, cpu, 1, runtime.node);
        costs.push(measured.cpuUs);
        return { value: measured.rate };
      },
      0,
    );
    const cpuUs = stat(costs).median;
    results[`${k(`${mode}_verify`)}.cpu_us`] = cpuUs;
    record(section, k(`${mode}_verify`), `${figure}${on}`, '/s', rates.values, {
      note: `a real token, one at a time, in a process on B's core; ${Math.round(cpuUs)} µs of CPU each`,
    });
  }

  const limitOf = (http: number, verify: number) => 1 / (1 / http + 1 / verify);
  const limit = limitOf(r(k('node_http')), r(k('jose_verify')));
  derive(section, k('jose_limit'), `jose limit 1/(1/node_http + 1/jose_verify)${on}`, 'r/s', limit);
  const physical = limitOf(r(k('node_http')), r(k('raw_verify')));
  derive(section, k('limit'), `physical limit 1/(1/node_http + 1/raw_verify)${on}`, 'r/s', physical);

  const node = runtime.node ? { node: runtime.node } : {};
  const b = await startB({ dir, storageDir, jwksFile: key.jwksFile, cpu, ...node });
  log(`small files: B, memory store, a fresh token per request${on}`);
  const memory = await bSmall(b, limit);
  record(section, k('b_memory'), `B, memory store, fresh token per request${on}`, 'r/s', memory.values, {
    invalid: memory.invalid,
    note: memory.note,
  });
  if (memory.perRequestUs !== undefined) results[`${k('b_memory')}.cpu_us`] = memory.perRequestUs;
  await b.server.stop();

  const redis = await benchRedis(pinning, config.redisUrl);
  const client = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 2000 });
  client.on('error', () => {});
  const redisOk = await client.connect().then(
    () => client.ping().then(() => true),
    (error: unknown) => {
      notes.push(`Redis at ${redis.url} does not answer (${error}): B with Redis not measured`);
      log(notes.at(-1) as string);
      return false;
    },
  );
  client.disconnect();
  if (redisOk) {
    const prefix = `bench:${nanoid(8)}:`;
    const br = await startB({
      dir,
      storageDir,
      jwksFile: key.jwksFile,
      cpu,
      env: { REDIS_URL: redis.url, REDIS_KEY_PREFIX: prefix },
      ...node,
    });
    log(`small files: B, Redis store, a fresh token per request${on}`);
    const withRedis = await bSmall(br, limit);
    record(section, k('b_redis'), `B, Redis store, fresh token per request${on}`, 'r/s', withRedis.values, {
      invalid: withRedis.invalid,
      note: `${withRedis.note}; Redis: ${redis.note}`,
    });
    if (withRedis.perRequestUs !== undefined) results[`${k('b_redis')}.cpu_us`] = withRedis.perRequestUs;
    await br.server.stop();
    await deleteKeys(redis.url, prefix);
  }
  await redis.stop();

  derive(
    section,
    k('b_memory_of_jose_limit'),
    `B (memory) / jose limit${on}`,
    'fraction',
    r(k('b_memory')) / limit,
  );
  derive(
    section,
    k('b_memory_of_limit'),
    `B (memory) / physical limit${on}`,
    'fraction',
    r(k('b_memory')) / physical,
  );
  derive(
    section,
    k('b_memory_of_node_http'),
    `B (memory) / node:http${on}`,
    'fraction',
    r(k('b_memory')) / r(k('node_http')),
  );
  // The same ratio from CPU time per request rather than rates: on a machine other work shares, a
  // rate moves with what else runs, the CPU time a request takes much less. Each side is CPU time
  // of all the process's threads (jose's verification included its thread-pool job).
  const joseUs = r(`${k('jose_verify')}.cpu_us`);
  derive(
    section,
    k('b_memory_of_jose_limit_cpu'),
    `B (memory) / jose limit, by server CPU time per request${on}`,
    'fraction',
    (r(`${k('node_http')}.cpu_us`) + joseUs) / r(`${k('b_memory')}.cpu_us`),
    `node:http ${Math.round(r(`${k('node_http')}.cpu_us`))} µs + jose ${Math.round(joseUs)} µs against B ${Math.round(r(`${k('b_memory')}.cpu_us`))} µs`,
  );
  if (!runtime.node)
    derive(
      section,
      k('b_memory_of_static'),
      'B (memory) / @fastify/static',
      'fraction',
      r(k('b_memory')) / r(k('fastify_static')),
    );
  if (redisOk) {
    derive(
      section,
      k('b_redis_of_jose_limit'),
      `B (Redis) / jose limit${on}`,
      'fraction',
      r(k('b_redis')) / limit,
    );
    // Cost per request: time per request with Redis over time per request in memory, minus one.
    derive(
      section,
      k('redis_cost'),
      `Redis cost per request vs memory${on}`,
      '%',
      r(k('b_memory')) / r(k('b_redis')) - 1,
    );
    derive(
      section,
      k('redis_cost_cpu'),
      `Redis cost per request vs memory, by server CPU time${on}`,
      '%',
      r(`${k('b_redis')}.cpu_us`) / r(`${k('b_memory')}.cpu_us`) - 1,
    );
  }
}

/**
 * The same comparison with nothing pinned but the load generator: B's thread pool may verify on
 * the other core (which the load generator shares), so jose's asynchronous verification can run
 * beside the event loop. Against the same baselines, unpinned.
 */
async function smallUnpinned() {
  const section = 'unpinned';
  const all = pinning.allCpus;
  const http = await startBaseline('http', staticDir, all);
  try {
    log('small files, unpinned: plain node:http');
    const measured = await repeat('node:http (unpinned)', (run) =>
      withCpu(http.server.pid, () =>
        load({
          url: `${http.origin}/small.bin`,
          connections: config.connections,
          durationS: run < 0 ? config.warmupS : config.durationS,
        }),
      ).then(loadValue),
    );
    record(section, 'unpinned.node_http', 'node:http, 4 KiB, unpinned', 'r/s', measured.values, {
      invalid: measured.invalid,
      note: measured.note,
    });
  } finally {
    await http.server.stop();
  }
  for (const mode of ['raw', 'jose'] as const) {
    const figure = `${mode === 'raw' ? 'raw verify (node:crypto)' : 'jose jwtVerify'}, ${TOKEN_ALGORITHM}, unpinned`;
    const rates = await repeat(
      figure,
      async () => ({ value: (await cryptoCost(TOKEN_ALGORITHM, mode, all)).rate }),
      0,
    );
    record(section, `unpinned.${mode}_verify`, figure, '/s', rates.values, { note: 'one at a time' });
  }
  const limit = 1 / (1 / r('unpinned.node_http') + 1 / r('unpinned.jose_verify'));
  derive(section, 'unpinned.jose_limit', 'jose limit, unpinned', 'r/s', limit);
  const physical = 1 / (1 / r('unpinned.node_http') + 1 / r('unpinned.raw_verify'));
  derive(section, 'unpinned.limit', 'physical limit, unpinned', 'r/s', physical);

  const b = await startB({ dir, storageDir, jwksFile: key.jwksFile, cpu: all });
  try {
    log('small files, unpinned: B, memory store, a fresh token per request');
    const memory = await bSmall(b, limit);
    record(section, 'unpinned.b_memory', 'B, memory store, unpinned', 'r/s', memory.values, {
      invalid: memory.invalid,
      note: memory.note,
    });
  } finally {
    await b.server.stop();
  }
  derive(
    section,
    'unpinned.b_of_jose_limit',
    'B (memory) / jose limit, unpinned',
    'fraction',
    r('unpinned.b_memory') / limit,
  );
  derive(
    section,
    'unpinned.b_of_limit',
    'B (memory) / physical limit, unpinned',
    'fraction',
    r('unpinned.b_memory') / physical,
  );
}

// ---------------------------------------------------------------------------------------------
// 0. The algorithm

/** A token-crypto rate and its CPU time per operation (µs), from `crypto-child.ts`. */
async function cryptoCost(
  alg: TokenAlgorithm,
  mode: 'raw' | 'jose' | 'ours' | 'sign',
  cpus: string | undefined,
  inflight = 1,
  node = process.execPath,
): Promise<{ rate: number; cpuUs: number }> {
  const args = ['--import', 'tsx', 'test/bench/crypto-child.ts'];
  const [command, argv] = cpus ? ['taskset', ['-c', cpus, node, ...args]] : [node, args];
  const { stdout } = await execFileAsync(command as string, argv as string[], {
    cwd: ROOT,
    env: {
      PATH: env.PATH,
      HOME: env.HOME,
      ALG: alg,
      MODE: mode,
      INFLIGHT: String(inflight),
      SECONDS: String(Math.max(1, config.durationS / 2)),
      FILE: JSON.stringify(smallFile satisfies FileClaims),
    },
  });
  return JSON.parse(stdout) as { rate: number; cpuUs: number };
}

/**
 * ES256 against EdDSA, both through jose: verification one at a time on B's core (what bounds B
 * pinned), 32 in flight on both cores (what B's thread pool can do unpinned), and signing (A).
 */
async function algorithms() {
  const section = 'alg';
  const scenarios = [
    ['jose', cpu, 1, "jose jwtVerify, one at a time, B's core"],
    ['jose', pinning.allCpus, 1, 'jose jwtVerify, one at a time, unpinned'],
    ['jose', pinning.allCpus, 32, 'jose jwtVerify, 32 in flight, unpinned'],
    ['raw', cpu, 1, "node:crypto verify, B's core"],
    ['sign', cpu, 1, "jose SignJWT (signDownloadToken), one at a time, B's core"],
  ] as const;
  for (const alg of TOKEN_ALGORITHMS) {
    for (const [mode, cpus, inflight, label] of scenarios) {
      const figure = `${alg}: ${label}`;
      log(`algorithms: ${figure}`);
      const rates = await repeat(
        figure,
        async () => ({ value: (await cryptoCost(alg, mode, cpus, inflight)).rate }),
        0,
      );
      record(
        section,
        `alg.${alg}.${mode}.${cpus === cpu ? 'pinned' : 'unpinned'}.${inflight}`,
        figure,
        '/s',
        rates.values,
      );
    }
  }
  for (const [mode, cpus, inflight, label] of scenarios) {
    const keyOf = (alg: TokenAlgorithm) =>
      `alg.${alg}.${mode}.${cpus === cpu ? 'pinned' : 'unpinned'}.${inflight}`;
    derive(
      section,
      `alg.ratio.${keyOf('ES256')}`,
      `ES256 / EdDSA: ${label}`,
      'fraction',
      r(keyOf('ES256')) / r(keyOf('EdDSA')),
    );
  }
}

/**
 * B under small-file load, every request with its own fresh token. Tokens are minted before
 * each run (child processes, B idle), enough for 1.3× the expected rate; a run that still
 * runs out is repeated once with twice as many.
 */
async function bSmall(b: BProcess, limit: number) {
  let expected = Number.isFinite(limit) ? limit : 10_000;
  return repeat('B', async (run) => {
    const durationS = run < 0 ? config.warmupS : config.durationS;
    let result: LoadResult | undefined;
    for (let attempt = 0; attempt < 2; attempt++) {
      const count = Math.ceil(expected * durationS * 1.3 * 2 ** attempt) + 4 * config.connections;
      const minting = performance.now();
      const tokens = await mintMany(key, b.origin, smallFile, count, config.mintProcesses, pinning.allCpus);
      log(`  minted ${count} tokens in ${((performance.now() - minting) / 1000).toFixed(1)} s`);
      let next = 0;
      let exhausted = false;
      const measured = await withCpu(b.server.pid, () =>
        load({
          url: b.origin,
          connections: config.connections,
          durationS,
          next: () => {
            if (next >= tokens.length) {
              exhausted = true;
              return { path: `/d/${tokens[tokens.length - 1]}/small.bin` };
            }
            return { path: `/d/${tokens[next++]}/small.bin` };
          },
        }),
      );
      result = measured.result;
      if (run < 0) expected = Math.max(expected, result.rate);
      if (!exhausted) return loadValue(measured);
      log(`  ${count} tokens ran out: again with twice as many`);
    }
    return { value: result?.rate ?? Number.NaN, invalid: 'tokens ran out' };
  });
}

// ---------------------------------------------------------------------------------------------
// 2. Large files

async function largeFiles(baselines: Record<'http' | 'static', BProcess>, runtime: Runtime) {
  const section = 'large';
  const k = (name: string) => `large.${name}${runtime.suffix}`;
  const on = runtime.label;
  const node = runtime.node ? { node: runtime.node } : {};
  const size = config.largeBytes;
  const sizeLabel = size >= GIB ? `${size / GIB} GiB` : `${size / MIB} MiB`;
  if (!largeFile) {
    log(`large files: writing a ${sizeLabel} file`);
    const written = performance.now();
    largeFile = await putLargeFile(storageDir, staticDir, 'large.bin', size);
    log(`  written in ${((performance.now() - written) / 1000).toFixed(1)} s`);
  }
  const file = largeFile;

  const http = runtime.node ? await startBaseline('http', staticDir, cpu, runtime.node) : baselines.http;
  const b = await startB({ dir, storageDir, jwksFile: key.jwksFile, cpu, ...node });
  const targets: [string, string, number, () => Promise<string>][] = [
    [
      k('node_http'),
      `node:http + fs.createReadStream${on}`,
      http.server.pid,
      async () => `${http.origin}/large.bin`,
    ],
    ...(runtime.node
      ? []
      : ([
          [
            k('node_http_256k'),
            'node:http + fs.createReadStream, 256 KiB reads (as B)',
            http.server.pid,
            async () => `${http.origin}/large.bin?hwm=${256 * KIB}`,
          ],
          [
            k('fastify_static'),
            '@fastify/static',
            baselines.static.server.pid,
            async () => `${baselines.static.origin}/large.bin`,
          ],
        ] as [string, string, number, () => Promise<string>][])),
    [
      k('b'),
      `B (memory store)${on}`,
      b.server.pid,
      async () => `${b.origin}/d/${await mintOne(key, b.origin, file)}`,
    ],
  ];
  for (const [name, label, pid, url] of targets) {
    log(`large files: ${label}, ${config.downloads} concurrent downloads`);
    const measured = await repeat(
      label,
      async () => {
        const urls = await Promise.all(Array.from({ length: config.downloads }, url));
        const started = performance.now();
        const { result: done, cpu } = await withCpu(pid, () => Promise.all(urls.map((u) => download(u))));
        const seconds = (performance.now() - started) / 1000;
        const bytes = done.reduce((sum, d) => sum + d.bytes, 0);
        const bad = done.filter((d) => d.status !== 200 || d.bytes !== size).length;
        return {
          value: bytes / seconds / 1e9,
          invalid: bad ? `${bad} downloads incomplete` : undefined,
          cpu,
        };
      },
      // No warm-up: the file is in the page cache since it was written, and streaming needs no JIT.
      0,
    );
    record(
      section,
      name,
      `${label}, ${sizeLabel} × ${config.downloads} concurrent`,
      'GB/s',
      measured.values,
      {
        invalid: measured.invalid,
        note: measured.note,
      },
    );
  }
  await b.server.stop();
  if (http !== baselines.http) await http.server.stop();
  derive(
    section,
    k('b_of_node_http'),
    `B / node:http throughput${on}`,
    'fraction',
    r(k('b')) / r(k('node_http')),
  );
  if (!runtime.node) {
    derive(
      section,
      k('b_of_node_http_256k'),
      'B / node:http (256 KiB reads) throughput',
      'fraction',
      r(k('b')) / r(k('node_http_256k')),
    );
    derive(
      section,
      k('b_of_static'),
      'B / @fastify/static throughput',
      'fraction',
      r(k('b')) / r(k('fastify_static')),
    );
  }

  // Peak RSS: each scenario on a fresh B, so that nothing earlier counts (a process rarely gives
  // memory back, so an earlier peak would show up as the next one's starting point).
  const idles: number[] = [];
  const peaks: number[] = [];
  const rssScenario = async (
    rowKey: string,
    figure: string,
    options: { bytesPerSecond?: number; abortAfterMs?: number },
  ) => {
    const fresh = await startB({ dir, storageDir, jwksFile: key.jwksFile, cpu });
    try {
      // One small download first: "idle" is then a B that has served (code compiled, modules
      // loaded), and the peak is what the large downloads add.
      await download(`${fresh.origin}/d/${await mintOne(key, fresh.origin, smallFile)}`);
      await sleep(500);
      idles.push(rssOf(fresh.server.pid));
      log(`large files: ${figure}`);
      const measured = await peakRss(fresh.server.pid, async () => {
        const urls = await Promise.all(
          Array.from(
            { length: config.rssDownloads },
            async () => `${fresh.origin}/d/${await mintOne(key, fresh.origin, file)}`,
          ),
        );
        return Promise.all(urls.map((u) => download(u, options)));
      });
      const slow = options.abortAfterMs !== undefined;
      const bad = measured.result.filter((d) => d.status !== 200 || (!slow && d.bytes !== size)).length;
      const readMiB = measured.result.reduce((sum, d) => sum + d.bytes, 0) / MIB / measured.result.length;
      peaks.push(measured.peak);
      record(section, rowKey, figure, 'MB', bad ? [] : [measured.peak], {
        invalid: bad ? [`${bad} downloads failed`] : [],
        note: `${slow ? `each read ${readMiB.toFixed(1)} MiB, then aborted; ` : ''}VmHWM after clear_refs, and VmRSS polled every 50 ms`,
      });
      await sleep(300);
      const healthy = await fetch(`${fresh.origin}/readyz`).then(
        (response) => response.ok,
        () => false,
      );
      if (!healthy) notes.push(`B did not answer /readyz after: ${figure}`);
    } finally {
      await fresh.server.stop();
    }
  };
  await rssScenario(
    k('b_rss_fast'),
    `B peak RSS, ${config.rssDownloads} × ${sizeLabel} at full speed${on}`,
    {},
  );
  await rssScenario(
    k('b_rss_slow'),
    `B peak RSS, ${config.rssDownloads} slow readers (${config.slowBytesPerSecond / MIB} MiB/s, ${config.slowSeconds} s)${on}`,
    { bytesPerSecond: config.slowBytesPerSecond, abortAfterMs: config.slowSeconds * 1000 },
  );
  const idle = Math.min(...idles);
  record(section, k('b_rss_idle'), `B RSS, idle after one small download${on}`, 'MB', [idle], {
    note: 'the bundle `npm start` runs (`npm run build`)',
  });
  derive(
    section,
    k('b_rss_growth'),
    `B peak RSS over idle, worst of the two${on}`,
    'MB',
    Math.max(...peaks) - idle,
  );
}

// ---------------------------------------------------------------------------------------------
// 3. Minting and 4. end to end

async function minting() {
  // Real Postgres: a fresh schema through the tests' own helper.
  let postgresOk = false;
  const check = new pg.Client({ connectionString: config.databaseUrl, connectionTimeoutMillis: 3000 });
  try {
    await check.connect();
    postgresOk = true;
  } catch (error) {
    notes.push(
      `Postgres at ${config.databaseUrl} does not answer (${error}): minting on Postgres not measured`,
    );
    log(notes.at(-1) as string);
  } finally {
    await check.end().catch(() => {});
  }
  if (postgresOk) {
    env.TEST_DATABASE_URL = config.databaseUrl;
    const db = await createTestDatabase();
    try {
      await appScenario('postgres', { DATABASE_URL: db.url });
    } finally {
      await db.close();
    }
  }

  // Embedded PGlite, as `npm start` runs it: a copy of a data folder initialised once.
  const template = join(dir, 'pglite-template');
  log('minting: initialising a PGlite data folder');
  const { PGlite } = await import('@electric-sql/pglite');
  const pglite = await PGlite.create(template);
  await pglite.close();
  await appScenario('pglite', {}, template);
}

async function appScenario(
  database: 'postgres' | 'pglite',
  databaseEnv: Record<string, string>,
  template?: string,
) {
  const dataDir = join(dir, `app-${database}`);
  await mkdir(dataDir, { recursive: true });
  if (template) await cp(template, join(dataDir, 'pg'), { recursive: true });
  const [appPort, downloadPort] = [await freePort(), await freePort()];
  const appOrigin = `http://127.0.0.1:${appPort}`;
  const downloadOrigin = `http://127.0.0.1:${downloadPort}`;
  const shared = { DATA_DIR: dataDir, APP_PUBLIC_URL: appOrigin, DOWNLOAD_PUBLIC_URL: downloadOrigin };
  const servers: Server[] = [];
  try {
    log(`minting: starting A on ${database}`);
    const a = await startProcess({
      entry: APP_SERVER,
      env: {
        ...shared,
        ...databaseEnv,
        APP_PORT: String(appPort),
        ARGON2_MEMORY_KIB: '64',
        ARGON2_TIME_COST: '1',
        // The limit stays on (its count is part of every mint) but never refuses the bench's users.
        MINT_RATE_PER_MINUTE: String(2 ** 31 - 1),
      },
      readyUrl: `${appOrigin}/readyz`,
      cpu,
    });
    servers.push(a);
    const b = await startProcess({
      entry: DOWNLOAD_SERVER,
      env: {
        ...shared,
        DOWNLOAD_PORT: String(downloadPort),
        DATA_DIR: join(dataDir, 'b'),
        STORAGE_DIR: join(dataDir, 'files'),
      },
      readyUrl: `${downloadOrigin}/readyz`,
      cpu,
    });
    servers.push(b);
    const users = await mintingUsers(appOrigin, MINTING_USERS, Buffer.alloc(config.smallBytes, 'y'));

    if (config.only.includes('mint')) {
      log(`minting: POST /api/files/:id/download-token on ${database}`);
      const options = (durationS: number): LoadOptions => ({
        url: appOrigin,
        method: 'POST',
        next: users.next,
        connections: config.connections,
        durationS,
      });
      const mints = await repeat(`mint (${database})`, async (run) => {
        const measured = await withCpu(a.pid, () =>
          load(options(run < 0 ? config.warmupS : config.durationS)),
        );
        if (measured.result.invalid) log(`  A's output ends with:\n${a.output().slice(-1500)}`);
        return loadValue(measured);
      });
      record(
        'mint',
        `mint.${database}`,
        `A mints, ${database === 'postgres' ? 'Postgres' : 'PGlite (embedded)'}`,
        'tokens/s',
        mints.values,
        {
          invalid: mints.invalid,
          note: `${mints.note}; ${database === 'postgres' ? 'Postgres is not pinned' : 'PGlite runs inside A (core 0)'}`,
        },
      );
    }

    if (config.only.includes('e2e')) {
      log(`end to end: ${config.clicks} sequential clicks (${database})`);
      const { user, fileId } = users.first;
      const times = await clicks(appOrigin, `/files/${fileId}/download`, user.jar.header() ?? '');
      record(
        'e2e',
        `e2e.${database}.median`,
        `click → first byte from B, median (${database})`,
        'ms',
        times.failed ? [] : [percentile(times.ms, 50)],
        {
          invalid: times.failed ? [`${times.failed} clicks failed`] : [],
          note: `${times.ms.length} sequential clicks, keep-alive connections`,
        },
      );
      record(
        'e2e',
        `e2e.${database}.p99`,
        `click → first byte from B, p99 (${database})`,
        'ms',
        times.failed ? [] : [percentile(times.ms, 99)],
      );
    }
  } finally {
    for (const server of servers.reverse()) await server.stop();
  }
}

interface Answer {
  status: number;
  headers: IncomingHttpHeaders;
  /** When the first byte of the body (or the end of an empty one) arrived. */
  firstByte: number;
}

function get(url: string, headers: Record<string, string>, agent: Agent): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { headers, agent }, (response) => {
      let firstByte = 0;
      response.on('data', () => {
        firstByte ||= performance.now();
      });
      response.on('end', () =>
        resolve({
          status: response.statusCode ?? 0,
          headers: response.headers,
          firstByte: firstByte || performance.now(),
        }),
      );
      response.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

async function clicks(appOrigin: string, path: string, cookie: string) {
  const agentA = new Agent({ keepAlive: true, maxSockets: 1 });
  const agentB = new Agent({ keepAlive: true, maxSockets: 1 });
  const ms: number[] = [];
  let failed = 0;
  const total = config.clicks + 20;
  for (let i = 0; i < total; i++) {
    const started = performance.now();
    const redirect = await get(`${appOrigin}${path}`, { cookie, accept: 'text/html' }, agentA);
    const location = redirect.headers.location;
    if (redirect.status !== 303 || !location) {
      failed++;
      continue;
    }
    const file = await get(location, { accept: 'text/html' }, agentB);
    if (file.status !== 200) failed++;
    // The first 20 warm up.
    else if (i >= 20) ms.push(file.firstByte - started);
  }
  agentA.destroy();
  agentB.destroy();
  return { ms, failed };
}

// ---------------------------------------------------------------------------------------------
// Report

async function report() {
  const targets = [
    ...runtimes.flatMap(({ suffix, label }) => [
      target(
        `small: B (memory) ≥ 0.85 of the jose limit (pinned)${label}`,
        results[`small.b_memory_of_jose_limit${suffix}`],
        (v) => v >= TARGETS.limitFraction,
        (v) => v.toFixed(2),
      ),
      target(
        `small: Redis costs ≤ 10% more than memory${label}`,
        results[`small.redis_cost${suffix}`],
        (v) => v <= TARGETS.redisCost,
        (v) => `${(v * 100).toFixed(1)}%`,
      ),
      target(
        `large: B ≥ 0.9 of node:http throughput${label}`,
        results[`large.b_of_node_http${suffix}`],
        (v) => v >= TARGETS.largeFraction,
        (v) => v.toFixed(2),
      ),
      target(
        `large: B peak RSS ≤ 128 MB, 8 downloads at full speed${label}`,
        results[`large.b_rss_fast${suffix}`],
        (v) => v <= TARGETS.rssBytes,
        (v) => `${(v / 1e6).toFixed(1)} MB`,
      ),
      target(
        `large: B peak RSS ≤ 128 MB, 8 slow readers${label}`,
        results[`large.b_rss_slow${suffix}`],
        (v) => v <= TARGETS.rssBytes,
        (v) => `${(v / 1e6).toFixed(1)} MB`,
      ),
    ]),
    target(
      'minting: ≥ 2,000 tokens/s on Postgres',
      results['mint.postgres'],
      (v) => v >= TARGETS.mintRate,
      (v) => `${Math.round(v)}/s`,
    ),
  ];

  const lines: string[] = [];
  lines.push(`## Benchmark${QUICK ? ' (BENCH_QUICK: one short run each, not for comparison)' : ''}`);
  lines.push('');
  lines.push(
    `Machine: ${host.cpu}, ${host.cores} cores, ${host.memoryGiB} GiB, Node ${host.node}${runtimes[1] ? ` and ${runtimes[1].version} (the rows marked "${runtimes[1].label.slice(2)}")` : ''} (${host.platform}); load average at start ${host.loadAverage}${busy ? ' — BUSY, figures not representative' : ''}.`,
  );
  lines.push(
    `Pinning: ${pinning.note}. Runs: ${config.runs} × ${config.durationS} s after a ${config.warmupS} s warm-up, ${config.connections} connections; median (min–max). Command: \`${QUICK ? 'BENCH_QUICK=1 ' : ''}npm run bench\`.`,
  );
  lines.push('');
  lines.push('| Figure | Median | Min–max | Unit | Note |');
  lines.push('|---|---:|---:|---|---|');
  for (const row of rows) {
    const s = row.stat;
    const range = s.runs.length > 1 ? `${fmt(s.min, row.unit)}–${fmt(s.max, row.unit)}` : '';
    const note = [row.note, row.invalid?.length ? `discarded: ${row.invalid.join('; ')}` : undefined]
      .filter(Boolean)
      .join('; ');
    lines.push(`| ${row.figure} | ${fmt(s.median, row.unit)} | ${range} | ${row.unit} | ${note} |`);
  }
  lines.push('');
  lines.push('| Target | Measured | Met |');
  lines.push('|---|---:|---|');
  for (const t of targets)
    lines.push(`| ${t.name} | ${t.measured} | ${t.met === undefined ? 'n/a' : t.met ? 'yes' : 'NO'} |`);
  for (const note of notes) lines.push(`\nNote: ${note}`);
  const table = lines.join('\n');
  process.stdout.write(`\n${table}\n`);

  const resultsDir = await resultsFolder();
  await writeFile(
    join(resultsDir, 'latest.json'),
    `${JSON.stringify(
      {
        startedAt: startedAt.toISOString(),
        finishedAt: new Date().toISOString(),
        machine: host,
        busy,
        pinning,
        config,
        results,
        rows: rows.map((row) => ({ ...row, stat: { ...row.stat } })),
        targets,
        notes,
        table,
      },
      null,
      2,
    )}\n`,
  );
  log(`written to test/bench/results/latest.json`);
}

function target(
  name: string,
  value: number | undefined,
  ok: (v: number) => boolean,
  show: (v: number) => string,
) {
  const measured = value !== undefined && Number.isFinite(value);
  return {
    name,
    value: measured ? value : null,
    measured: measured ? show(value) : 'n/a',
    met: measured ? ok(value) : undefined,
  };
}
