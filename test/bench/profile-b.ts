/**
 * `npx tsx test/bench/profile-b.ts`: B under the small-file load of `npm run bench` (4 KiB, a
 * fresh token per request) with `node --cpu-prof`, then the functions with the most self time and
 * the same grouped by package. The profile stays in `test/bench/results/` for a closer look
 * (Chrome DevTools → Performance → Load profile).
 * PROFILE_SECONDS (default 10), PROFILE_REDIS=1 (Redis store instead of memory).
 */
import { mkdir, mkdtemp, readdir, readFile, rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { nanoid } from 'nanoid';
import { buildDownloadServer, freePort } from '../support/processes.ts';
import { mintMany, putSmallFile, signingKey, startB } from './fixtures.ts';
import { deleteKeys, KIB, load, pinLoadGenerator, ROOT, resultsFolder, stopAll } from './lib.ts';

const seconds = Number(process.env.PROFILE_SECONDS ?? 10);
const redis = process.env.PROFILE_REDIS === '1';
/** Expected rate, for the number of tokens to mint (1.3× this × PROFILE_SECONDS). */
const rate = Number(process.env.PROFILE_RATE ?? 6000);
buildDownloadServer();
const port = await freePort();
const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const prefix = `prof:${nanoid(8)}:`;
const pinning = pinLoadGenerator();
const dir = await mkdtemp(join(tmpdir(), 'sfh-profile-'));
const profileDir = join(dir, 'profile');
const storageDir = join(dir, 'objects');
const staticDir = join(dir, 'static');
await mkdir(storageDir, { recursive: true });
await mkdir(staticDir, { recursive: true });

try {
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
    nodeArgs: ['--cpu-prof', '--cpu-prof-dir', profileDir],
    ...(redis ? { env: { REDIS_URL: redisUrl, REDIS_KEY_PREFIX: prefix } } : {}),
  });
  const ready = performance.now();
  let next = 0;
  const result = await load({
    url: b.origin,
    connections: 16,
    durationS: seconds,
    nextPath: () => `/d/${tokens[Math.min(next++, tokens.length - 1)]}/small.bin`,
  });
  const loaded = performance.now();
  if (next > tokens.length) process.stderr.write('tokens ran out: raise PROFILE_RATE\n');
  process.stderr.write(
    `B (${redis ? 'Redis' : 'memory'}): ${Math.round(result.rate)} r/s${result.invalid ? ` [${result.invalid}]` : ''}; ${pinning.note}\n`,
  );
  await b.server.stop();

  const [name] = (await readdir(profileDir)).filter((f) => f.endsWith('.cpuprofile'));
  if (!name) throw new Error('no profile written');
  const resultsDir = await resultsFolder();
  const kept = join(resultsDir, `b-${redis ? 'redis' : 'memory'}.cpuprofile`);
  await rename(join(profileDir, name), kept);
  // Only the samples taken under load: B's start (module loading) and its exit are left out.
  summarise(JSON.parse(await readFile(kept, 'utf8')) as Profile, {
    fromUs: (ready - spawned + 200) * 1000,
    toUs: (loaded - spawned) * 1000,
  });
  process.stderr.write(`profile: ${kept}\n`);
} finally {
  await stopAll();
  await rm(dir, { recursive: true, force: true });
  if (redis) await deleteKeys(redisUrl, prefix);
}

interface Profile {
  nodes: {
    id: number;
    callFrame: { functionName: string; url: string; lineNumber: number };
  }[];
  samples: number[];
  timeDeltas: number[];
}

function summarise(profile: Profile, window: { fromUs: number; toUs: number }) {
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
    const where = url.replace(/^file:\/\//, '').replace(ROOT, '');
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
  process.stdout.write(
    `\nMain thread under load: ${(total / 1e6).toFixed(1)} s sampled, ${((idle / total) * 100).toFixed(0)}% idle (waiting: the thread pool runs WebCrypto and fs work, which this profile does not see)\n\n| self | of busy | time | function |\n|---:|---:|---:|---|\n${top(self, 15)}\n\n| self | of busy | time | group |\n|---:|---:|---:|---|\n${top(byPackage, 15)}\n`,
  );
}

function group(where: string, functionName: string): string {
  if (!where) return functionName.startsWith('(') ? functionName : '(native)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(where);
  if (pkg) return pkg[1] as string;
  if (where.startsWith('node:')) return where.split('/').slice(0, 2).join('/');
  return where.split('/').slice(0, 4).join('/');
}
