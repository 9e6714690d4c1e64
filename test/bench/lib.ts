/**
 * Helpers of the benchmark suite: statistics, CPU pinning, server processes, autocannon runs,
 * raw downloads and memory sampling. Nothing here knows about the figures themselves (run.ts).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { availableParallelism, cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import { Redis } from 'ioredis';
import { freePort, nodeArgsFor } from '../support/processes.ts';
import { killRedis, spawnRedis } from '../support/redis-server.ts';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const KIB = 1024;
export const MIB = 1024 * KIB;
export const GIB = 1024 * MIB;

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------
// Statistics

/** One measured figure: every run's value, and its median with min–max. */
export interface Stat {
  runs: number[];
  median: number;
  min: number;
  max: number;
}

export function stat(runs: number[]): Stat {
  const sorted = [...runs].sort((a, b) => a - b);
  const n = sorted.length;
  const median =
    n === 0
      ? Number.NaN
      : n % 2 === 1
        ? (sorted[(n - 1) / 2] as number)
        : ((sorted[n / 2 - 1] as number) + (sorted[n / 2] as number)) / 2;
  return { runs, median, min: sorted[0] ?? Number.NaN, max: sorted[n - 1] ?? Number.NaN };
}

/** Nearest-rank percentile of unsorted samples. */
export function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b);
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank] as number;
}

// ---------------------------------------------------------------------------------------------
// Machine and CPU pinning

export interface Pinning {
  /** Cores of the servers under test (`taskset -c`), or undefined when nothing is pinned. */
  serverCpu: string | undefined;
  /** Core of this process, which is the load generator. */
  loadCpu: string | undefined;
  /** Every core, for helpers that may use them all (children inherit this process's core). */
  allCpus: string | undefined;
  note: string;
}

function hasTaskset(): boolean {
  try {
    execFileSync('taskset', ['-V'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * Pins this process (every thread: it is the load generator) to core 1 and returns what the
 * servers should be pinned to (core 0). Without `taskset` or with a single core, nothing is
 * pinned and the note says so.
 */
export function pinLoadGenerator(): Pinning {
  const cores = availableParallelism();
  if (cores < 2) {
    return {
      serverCpu: undefined,
      loadCpu: undefined,
      allCpus: undefined,
      note: `only ${cores} core: server and load share it`,
    };
  }
  if (!hasTaskset()) {
    return {
      serverCpu: undefined,
      loadCpu: undefined,
      allCpus: undefined,
      note: 'taskset not found: nothing pinned',
    };
  }
  try {
    execFileSync('taskset', ['-a', '-p', '-c', '1', String(process.pid)], { stdio: 'ignore' });
  } catch (error) {
    return {
      serverCpu: undefined,
      loadCpu: undefined,
      allCpus: undefined,
      note: `taskset failed (${error}): nothing pinned`,
    };
  }
  const note =
    cores > 2
      ? 'server on core 0, load generator on core 1; other cores idle'
      : 'server on core 0, load generator on core 1 (Postgres is not pinned: it shares both)';
  return { serverCpu: '0', loadCpu: '1', allCpus: `0-${cores - 1}`, note };
}

export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  node: string;
  platform: string;
  loadAverage: string;
}

export function machine(): Machine {
  let cpu = cpus()[0]?.model ?? 'unknown';
  try {
    const line = readFileSync('/proc/cpuinfo', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('model name'));
    if (line) cpu = line.slice(line.indexOf(':') + 1).trim();
  } catch {}
  let loadAverage = '';
  try {
    loadAverage = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  } catch {}
  return {
    cpu,
    cores: availableParallelism(),
    memoryGiB: Math.round(totalmem() / GIB),
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    loadAverage,
  };
}

// ---------------------------------------------------------------------------------------------
// Server processes

export interface Server {
  child: ChildProcess;
  pid: number;
  output(): string;
  stop(): Promise<void>;
}

const running = new Set<Server>();

/** Stops every server still running (on the way out, including after a failure). */
export async function stopAll(): Promise<void> {
  await Promise.all([...running].map((server) => server.stop()));
}

/**
 * Starts `node [nodeArgs] entry` (TypeScript through tsx), or `command` when given, pinned to
 * `cpu` with taskset when given, and waits until `readyUrl` answers 200. taskset execs the
 * command, so the pid is its own.
 */
export async function startProcess(options: {
  /** The entry point node runs, or with `command` the name used in errors. */
  entry: string;
  env: Record<string, string>;
  readyUrl: string;
  cpu: string | undefined;
  nodeArgs?: string[];
  /** The node binary (default: the one running the bench). */
  node?: string;
  /** A program other than node, with its arguments. */
  command?: string[];
}): Promise<Server> {
  const argv = options.command ?? [
    options.node ?? process.execPath,
    ...(options.nodeArgs ?? []),
    ...nodeArgsFor(options.entry),
  ];
  const [command, ...args] = options.cpu ? ['taskset', '-c', options.cpu, ...argv] : argv;
  const child = spawn(command as string, args, {
    cwd: ROOT,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, LOG_LEVEL: 'warn', ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const keep = (chunk: Buffer) => {
    // The last 64 KiB is plenty for an error report.
    output = (output + chunk).slice(-64 * KIB);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  const exited = once(child, 'exit');
  const server: Server = {
    child,
    pid: child.pid as number,
    output: () => output,
    async stop() {
      running.delete(server);
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
        await exited;
        clearTimeout(timer);
      }
    },
  };
  running.add(server);
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      running.delete(server);
      throw new Error(`${options.entry} exited with ${child.exitCode}:\n${output}`);
    }
    const ok = await fetch(options.readyUrl).then(
      async (response) => {
        await response.arrayBuffer();
        return response.ok;
      },
      () => false,
    );
    if (ok) return server;
    await sleep(100);
  }
  await server.stop();
  throw new Error(`${options.entry} did not become ready at ${options.readyUrl}:\n${output}`);
}

// ---------------------------------------------------------------------------------------------
// autocannon

export interface LoadResult {
  /** Completed responses per second over the run. */
  rate: number;
  ok: number;
  non2xx: number;
  errors: number;
  timeouts: number;
  durationS: number;
  latencyP99Ms: number;
  /** Why the run does not count, if it does not. */
  invalid?: string;
}

export interface LoadOptions {
  url: string;
  connections: number;
  durationS: number;
  method?: 'GET' | 'POST';
  headers?: Record<string, string>;
  /**
   * Path (and extra headers) of each request, called once per request: fresh tokens, or the
   * next of several users, come from here.
   */
  next?: () => { path: string; headers?: Record<string, string> };
}

/** One autocannon run from this process; any non-2xx answer, error or timeout makes it invalid. */
export async function load(options: LoadOptions): Promise<LoadResult> {
  const { next } = options;
  const result = await autocannon({
    url: options.url,
    connections: options.connections,
    duration: options.durationS,
    method: options.method ?? 'GET',
    ...(options.headers ? { headers: options.headers } : {}),
    ...(next
      ? {
          requests: [
            {
              setupRequest: (request) => {
                const { path, headers } = next();
                request.path = path;
                if (headers) request.headers = { ...request.headers, ...headers };
                return request;
              },
            },
          ],
        }
      : {}),
  });
  const total = result.requests.total;
  const out: LoadResult = {
    rate: total / result.duration,
    ok: result['2xx'],
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    durationS: result.duration,
    latencyP99Ms: result.latency.p99,
  };
  if (result.non2xx > 0 || result.errors > 0 || result.timeouts > 0) {
    const codes = Object.entries(result.statusCodeStats ?? {})
      .filter(([code]) => !code.startsWith('2'))
      .map(([code, { count }]) => `${count}× ${code}`)
      .join(', ');
    out.invalid = `${result.non2xx} non-2xx${codes ? ` (${codes})` : ''}, ${result.errors} errors, ${result.timeouts} timeouts`;
  } else if (result['2xx'] === 0) {
    out.invalid = 'no response';
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Raw downloads (large files)

export interface Download {
  status: number;
  /** Body bytes received. */
  bytes: number;
  ms: number;
}

// One read buffer for every download: reads are handled synchronously, one at a time.
const READ_BUFFER = Buffer.allocUnsafe(MIB);

/**
 * GETs `url` on a connection of its own and discards the body. A minimal HTTP/1.1 client over
 * `net` reading into one reused buffer (`onread`): `node:http`'s client allocates a buffer per
 * read and, on one core, tops out near 0.3 GB/s here at 100% CPU, so it would measure itself
 * instead of the server (curl and this client both reach the server's limit, at a fraction of a
 * core). Needs a Content-Length response (no chunked encoding), which every server here sends.
 * With `bytesPerSecond`, reads no faster than that; with `abortAfterMs`, tears the connection
 * down then (a slow reader giving up).
 */
export function download(
  url: string,
  options: { bytesPerSecond?: number; abortAfterMs?: number } = {},
): Promise<Download> {
  const target = new URL(url);
  const started = performance.now();
  return new Promise((resolve, reject) => {
    let head: Buffer = Buffer.alloc(0);
    let inBody = false;
    let status = 0;
    let bytes = 0;
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve({ status, bytes, ms: performance.now() - started });
    };
    const rate = options.bytesPerSecond;
    const socket = connect({
      host: target.hostname,
      port: Number(target.port || 80),
      onread: {
        buffer: READ_BUFFER,
        callback: (n: number, buffer: Uint8Array) => {
          if (inBody) bytes += n;
          else {
            head = Buffer.concat([head, buffer.subarray(0, n)]);
            const end = head.indexOf('\r\n\r\n');
            if (end === -1) {
              if (head.length > 64 * KIB) socket.destroy(new Error('response head too large'));
              return true;
            }
            inBody = true;
            status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(head.subarray(0, 16).toString('latin1'))?.[1] ?? 0);
            bytes = head.length - end - 4;
          }
          if (rate) {
            const aheadMs = (bytes / rate) * 1000 - (performance.now() - started);
            if (aheadMs > 5) {
              socket.pause();
              setTimeout(() => socket.resume(), aheadMs);
            }
          }
          return true;
        },
      },
    });
    socket.on('end', finish);
    socket.on('close', finish);
    socket.on('error', (error) => {
      if (!settled) reject(error);
    });
    socket.write(
      `GET ${target.pathname}${target.search} HTTP/1.1\r\nhost: ${target.host}\r\nconnection: close\r\n\r\n`,
    );
    if (options.abortAfterMs !== undefined) {
      timer = setTimeout(() => {
        finish();
        socket.destroy();
      }, options.abortAfterMs);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Memory of a process

function statusField(pid: number, field: string): number | undefined {
  try {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(
      readFileSync(`/proc/${pid}/status`, 'utf8'),
    );
    return match ? Number(match[1]) * KIB : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Peak RSS of `pid` while `work` runs: VmHWM, reset first (`clear_refs` 5) so earlier phases do
 * not count, and VmRSS polled every 50 ms as a cross-check (and fallback where the reset is not
 * allowed). Returns the larger.
 */
export async function peakRss<T>(pid: number, work: () => Promise<T>): Promise<{ peak: number; result: T }> {
  let hwmReset = true;
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
  } catch {
    hwmReset = false;
  }
  let polled = statusField(pid, 'VmRSS') ?? 0;
  const timer = setInterval(() => {
    polled = Math.max(polled, statusField(pid, 'VmRSS') ?? 0);
  }, 50);
  try {
    const result = await work();
    polled = Math.max(polled, statusField(pid, 'VmRSS') ?? 0);
    const hwm = hwmReset ? (statusField(pid, 'VmHWM') ?? 0) : 0;
    return { peak: Math.max(polled, hwm), result };
  } finally {
    clearInterval(timer);
  }
}

export const rssOf = (pid: number) => statusField(pid, 'VmRSS') ?? 0;

// ---------------------------------------------------------------------------------------------
// CPU time: tells whether the server or the load generator was the limit of a run

let clockTicks: number | undefined;
function ticksPerSecond(): number {
  if (clockTicks === undefined) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clockTicks = 100;
    }
  }
  return clockTicks;
}

/** User + system CPU seconds of a process, all its threads (the thread pool included). */
export function cpuSecondsOf(pid: number): number | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / ticksPerSecond();
  } catch {
    return undefined;
  }
}

/** Share of one core the server (`pid`) and this process (the load generator) used during `work`. */
export interface CpuShare {
  server: number | undefined;
  client: number;
}

export async function withCpu<T>(
  pid: number | undefined,
  work: () => Promise<T>,
): Promise<{ result: T; cpu: CpuShare }> {
  const serverBefore = pid === undefined ? undefined : cpuSecondsOf(pid);
  const clientBefore = process.cpuUsage();
  const started = performance.now();
  const result = await work();
  const seconds = (performance.now() - started) / 1000;
  const serverAfter = pid === undefined ? undefined : cpuSecondsOf(pid);
  const client = process.cpuUsage(clientBefore);
  return {
    result,
    cpu: {
      server:
        serverBefore !== undefined && serverAfter !== undefined
          ? (serverAfter - serverBefore) / seconds
          : undefined,
      client: (client.user + client.system) / 1e6 / seconds,
    },
  };
}

/** Deletes the keys a B left in Redis under `prefix` (they expire anyway; a bench leaves nothing). */
export async function deleteKeys(url: string, prefix: string): Promise<void> {
  const redis = new Redis(url, { maxRetriesPerRequest: 1, connectTimeout: 2000 });
  redis.on('error', () => {});
  try {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.del(...keys);
    } while (cursor !== '0');
  } finally {
    redis.disconnect();
  }
}

/** `test/bench/results/`, made if need be; what the runs write there is never committed. */
export async function resultsFolder(): Promise<string> {
  const dir = join(ROOT, 'test/bench/results');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, '.gitignore'), '*.json\n*.cpuprofile\n');
  return dir;
}

/** The Redis a bench's B talks to, and what to say about where it runs. */
export interface BenchRedis {
  url: string;
  note: string;
  stop(): Promise<void>;
}

/**
 * A redis-server of the bench's own on the load generator's core, so that Redis (in production
 * on a machine of its own) never takes B's core: what is measured is B's side of each command.
 * Without `redis-server` here, the Redis at `fallbackUrl`, unpinned.
 */
export async function benchRedis(pinning: Pinning, fallbackUrl: string): Promise<BenchRedis> {
  try {
    execFileSync('redis-server', ['--version'], { stdio: 'ignore' });
  } catch {
    return { url: fallbackUrl, note: `Redis at ${fallbackUrl}, not pinned`, stop: async () => {} };
  }
  const port = await freePort();
  const child = await spawnRedis(port, {
    extraArgs: ['--maxmemory-policy', 'noeviction'],
    cpu: pinning.loadCpu,
  });
  return {
    url: `redis://127.0.0.1:${port}`,
    note: `a redis-server of the bench's own${pinning.loadCpu ? `, on the load generator's core ${pinning.loadCpu}` : ''}`,
    stop: () => killRedis(child),
  };
}
