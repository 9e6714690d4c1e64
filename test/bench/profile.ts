/**
 * `npx tsx test/bench/profile.ts`: one server under a load of `npm run bench` with
 * `node --cpu-prof`, then the functions with the most self time and the same grouped by package.
 * The profile stays in `test/bench/results/` for a closer look (Chrome DevTools → Performance →
 * Load profile).
 * - PROFILE=b (default): B under the small-file load (4 KiB, a fresh token per request);
 *   PROFILE_REDIS=1 for the Redis store instead of memory.
 * - PROFILE=large: B streaming a 1 GiB file, 3 downloads at a time (as `npm run bench` measures it).
 * - PROFILE=mint: A minting (`POST /api/files/:id/download-token`) on the Postgres of
 *   TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test), in a schema of its own.
 * PROFILE_SECONDS (default 10).
 */
import { mkdir, mkdtemp, readdir, readFile, rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { nanoid } from 'nanoid';
import pg from 'pg';
import { APP_SERVER, buildDownloadServer, DOWNLOAD_SERVER, freePort } from '../support/processes.ts';
import { signingKey } from '../support/signing-key.ts';
import {
  MINTING_USERS,
  mintingUsers,
  mintMany,
  mintOne,
  putLargeFile,
  putSmallFile,
  startB,
} from './fixtures.ts';
import {
  benchRedis,
  download,
  GIB,
  KIB,
  type LoadResult,
  load,
  pinLoadGenerator,
  ROOT,
  resultsFolder,
  type Server,
  startProcess,
  stopAll,
} from './lib.ts';

const target = process.env.PROFILE ?? 'b';
const seconds = Number(process.env.PROFILE_SECONDS ?? 10);
const redis = process.env.PROFILE_REDIS === '1';
/** Expected rate, for the number of tokens to mint (1.3× this × PROFILE_SECONDS). */
const rate = Number(process.env.PROFILE_RATE ?? 6000);
const databaseUrl = process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const schema = `prof_${nanoid(8)
  .replace(/[^A-Za-z0-9]/g, '_')
  .toLowerCase()}`;
const pinning = pinLoadGenerator();
/** With PROFILE_REDIS=1, the bench's own Redis (as `npm run bench` runs it), stopped at the end. */
const store = redis
  ? await benchRedis(pinning, process.env.REDIS_URL ?? 'redis://127.0.0.1:6379')
  : undefined;
const dir = await mkdtemp(join(tmpdir(), 'sfh-profile-'));
const profileDir = join(dir, 'profile');
const nodeArgs = ['--cpu-prof', '--cpu-prof-dir', profileDir];

/** A server under --cpu-prof, the load it took, and when (µs into the profile) that load ran. */
interface Profiled {
  server: Server;
  result: LoadResult;
  name: string;
  /** What `result.rate` counts: requests, or for large files GB. */
  unit?: 'GB/s';
  window: { fromUs: number; toUs: number };
}

/** `work` measured from `spawned` (the server's start, which is when its profile starts). */
async function timed(spawned: number, work: () => Promise<LoadResult>) {
  const from = performance.now();
  const result = await work();
  return { result, window: { fromUs: (from - spawned) * 1000, toUs: (performance.now() - spawned) * 1000 } };
}

async function profileB(): Promise<Profiled> {
  buildDownloadServer();
  const port = await freePort();
  const storageDir = join(dir, 'objects');
  const staticDir = join(dir, 'static');
  await mkdir(storageDir, { recursive: true });
  await mkdir(staticDir, { recursive: true });
  const key = await signingKey(dir);
  const file = await putSmallFile(storageDir, staticDir, 'small.bin', Buffer.alloc(4 * KIB, 'x'));
  // Tokens first, so that the profile holds B's start and the load, not a wait for tokens.
  const audience = `http://127.0.0.1:${port}`;
  const tokens = await mintMany(key, audience, file, Math.ceil(rate * seconds * 1.3), 2, pinning.allCpus);
  const spawned = performance.now();
  const b = await startB({
    dir,
    storageDir,
    jwksFile: key.jwksFile,
    cpu: pinning.serverCpu,
    port,
    nodeArgs,
    ...(store ? { env: { REDIS_URL: store.url } } : {}),
  });
  let next = 0;
  const { result, window } = await timed(spawned, () =>
    load({
      url: b.origin,
      connections: 16,
      durationS: seconds,
      next: () => ({ path: `/d/${tokens[Math.min(next++, tokens.length - 1)]}/small.bin` }),
    }),
  );
  if (next > tokens.length) process.stderr.write('tokens ran out: raise PROFILE_RATE\n');
  return { server: b.server, result, name: `b-${redis ? 'redis' : 'memory'}`, window };
}

async function profileLarge(): Promise<Profiled> {
  buildDownloadServer();
  const storageDir = join(dir, 'objects');
  const staticDir = join(dir, 'static');
  await mkdir(storageDir, { recursive: true });
  await mkdir(staticDir, { recursive: true });
  const key = await signingKey(dir);
  const file = await putLargeFile(storageDir, staticDir, 'large.bin', GIB);
  const spawned = performance.now();
  const b = await startB({ dir, storageDir, jwksFile: key.jwksFile, cpu: pinning.serverCpu, nodeArgs });
  const { result, window } = await timed(spawned, async () => {
    const started = performance.now();
    let bytes = 0;
    while (performance.now() - started < seconds * 1000) {
      const urls = await Promise.all([1, 2, 3].map(() => mintOne(key, b.origin, file)));
      const done = await Promise.all(urls.map((token) => download(`${b.origin}/d/${token}`)));
      if (done.some((d) => d.status !== 200 || d.bytes !== GIB)) throw new Error('a download failed');
      bytes += done.length * GIB;
    }
    const durationS = (performance.now() - started) / 1000;
    return {
      rate: bytes / durationS / 1e9,
      ok: bytes / GIB,
      non2xx: 0,
      errors: 0,
      timeouts: 0,
      durationS,
      latencyP99Ms: 0,
    };
  });
  return { server: b.server, result, name: 'b-large', unit: 'GB/s', window };
}

async function profileMint(): Promise<Profiled> {
  await withClient((client) => client.query(`CREATE SCHEMA ${schema}`));
  const url = new URL(databaseUrl);
  url.searchParams.set('options', `-c search_path=${schema}`);
  const port = await freePort();
  const origin = `http://127.0.0.1:${port}`;
  const spawned = performance.now();
  const server = await startProcess({
    entry: APP_SERVER,
    env: {
      DATA_DIR: dir,
      DATABASE_URL: url.toString(),
      APP_PORT: String(port),
      APP_PUBLIC_URL: origin,
      DOWNLOAD_PUBLIC_URL: 'http://127.0.0.1:1',
      ARGON2_MEMORY_KIB: '64',
      ARGON2_TIME_COST: '1',
      // The limit stays on (its count is part of every mint) but never refuses the bench's users.
      MINT_RATE_PER_MINUTE: String(2 ** 31 - 1),
    },
    readyUrl: `${origin}/readyz`,
    cpu: pinning.serverCpu,
    nodeArgs,
  });
  const users = await mintingUsers(origin, MINTING_USERS, Buffer.alloc(4 * KIB, 'y'));
  const { result, window } = await timed(spawned, () =>
    load({ url: origin, method: 'POST', connections: 16, durationS: seconds, next: users.next }),
  );
  return { server, result, name: 'a-mint', window };
}

async function withClient(run: (client: pg.Client) => Promise<unknown>): Promise<void> {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  try {
    await run(client);
  } finally {
    await client.end();
  }
}

try {
  const { server, result, name, unit, window } = await (target === 'mint'
    ? profileMint()
    : target === 'large'
      ? profileLarge()
      : profileB());
  process.stderr.write(
    `${name}: ${unit ? `${result.rate.toFixed(2)} ${unit}` : `${Math.round(result.rate)} r/s`}${result.invalid ? ` [${result.invalid}]` : ''}; ${pinning.note}\n`,
  );
  await server.stop();

  const [file] = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile'));
  if (!file) throw new Error('no profile written');
  const kept = join(await resultsFolder(), `${name}.cpuprofile`);
  await rename(join(profileDir, file), kept);
  // Only the samples taken under load: the start (module loading) and the exit are left out.
  summarise(
    JSON.parse(await readFile(kept, 'utf8')) as Profile,
    window,
    await bundleModules(),
    unit ? 0 : Math.round(result.rate * result.durationS),
  );
  process.stderr.write(`profile: ${kept}\n`);
} finally {
  await stopAll();
  await rm(dir, { recursive: true, force: true });
  await store?.stop();
  if (target === 'mint')
    await withClient((client) => client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`));
}

interface Profile {
  nodes: {
    id: number;
    callFrame: { functionName: string; url: string; lineNumber: number };
  }[];
  samples: number[];
  timeDeltas: number[];
}

/**
 * The module each line of B's bundle comes from: esbuild marks the start of every module's code
 * with a `// path` comment, so a sample in the bundle is grouped by the package or source file it
 * came from rather than as "the bundle".
 */
async function bundleModules(): Promise<(line: number) => string | undefined> {
  const text = await readFile(join(ROOT, DOWNLOAD_SERVER), 'utf8').catch(() => '');
  const starts: [number, string][] = [];
  text.split('\n').forEach((line, index) => {
    const marker = /^\/\/ (\S+\.(?:[cm]?[jt]s|json|lua))$/.exec(line);
    if (marker) starts.push([index, (marker[1] as string).replace(/^(\.\.\/)+/, '')]);
  });
  return (line) => {
    let low = 0;
    let high = starts.length - 1;
    let found: string | undefined;
    while (low <= high) {
      const mid = (low + high) >> 1;
      const [start, path] = starts[mid] as [number, string];
      if (start <= line) {
        found = path;
        low = mid + 1;
      } else high = mid - 1;
    }
    return found;
  };
}

function summarise(
  profile: Profile,
  window: { fromUs: number; toUs: number },
  moduleOf: (line: number) => string | undefined,
  requests: number,
) {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map<string, number>();
  const byPackage = new Map<string, number>();
  let total = 0;
  let idle = 0;
  let at = 0;
  profile.samples.forEach((id, i) => {
    const delta = profile.timeDeltas[i] ?? 0;
    at += delta;
    const node = byId.get(id);
    if (!node || at < window.fromUs || at > window.toUs) return;
    total += delta;
    if (node.callFrame.functionName === '(idle)') idle += delta;
    const { functionName, url, lineNumber } = node.callFrame;
    const file = url.replace(/^file:\/\//, '').replace(ROOT, '');
    const where = file === DOWNLOAD_SERVER ? (moduleOf(lineNumber) ?? file) : file;
    const label = `${functionName || '(anonymous)'} ${where ? `${where}:${lineNumber + 1}` : ''}`.trim();
    self.set(label, (self.get(label) ?? 0) + delta);
    byPackage.set(group(where, functionName), (byPackage.get(group(where, functionName)) ?? 0) + delta);
  });
  const top = (map: Map<string, number>, n: number) =>
    [...map.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([label, us]) => {
        const ofBusy = label === '(idle)' ? '' : `${((us / (total - idle)) * 100).toFixed(1)}%`;
        return `| ${((us / total) * 100).toFixed(1)}% | ${ofBusy} | ${(us / 1000).toFixed(0)} ms | ${label} |`;
      })
      .join('\n');
  const perRequest = (us: number) => (requests > 0 ? `${(us / requests).toFixed(1)} µs` : '');
  const groups = [...byPackage.entries()]
    .filter(([label]) => label !== '(idle)')
    .sort((a, b) => b[1] - a[1])
    .map(([label, us]) => `| ${((us / (total - idle)) * 100).toFixed(1)}% | ${perRequest(us)} | ${label} |`)
    .join('\n');
  process.stdout.write(
    `\nMain thread under load: ${(total / 1e6).toFixed(1)} s sampled, ${((idle / total) * 100).toFixed(0)}% idle (waiting: the thread pool runs WebCrypto and fs work, which this profile does not see)${requests ? `; ${perRequest(total - idle)} busy per request over ${requests} requests` : ''}\n\n| self | of busy | time | function |\n|---:|---:|---:|---|\n${top(self, 15)}\n\n| of busy | per request | group |\n|---:|---:|---|\n${groups}\n`,
  );
}

function group(where: string, functionName: string): string {
  if (!where) return functionName.startsWith('(') ? functionName : '(native)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(where);
  if (pkg) return pkg[1] as string;
  if (where.startsWith('node:')) return where.split('/').slice(0, 2).join('/');
  // B's own modules (from the bundle) one by one, the workspace packages by package.
  if (where.startsWith('src/')) return `B ${where}`;
  return where.split('/').slice(0, 4).join('/');
}
