/**
 * MemoryReplayStore: the shared contract (memory only, and with a journal), then the journal's
 * own promises: claims survive restarts for as long as they matter (README "One download per
 * token": a used token is never accepted again, also after B restarts), rotation bounds disk use, and the
 * files are private. Time moves with `vi.setSystemTime` (only `Date` is faked; fs stays real).
 */
import { readFileSync } from 'node:fs';
import { appendFile, lstat, mkdir, readFile, rm, stat, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { nanoid } from 'nanoid';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { MemoryReplayStore } from '../../src/single-use/memory-store.ts';
import { tempDir } from '../helpers.ts';
import { claim, LIMITS, replayStoreContract, used } from './store.contract.ts';

replayStoreContract('MemoryReplayStore (memory only)', () => MemoryReplayStore.open({ windowMs: 60_000 }));
replayStoreContract('MemoryReplayStore (journal)', async () =>
  MemoryReplayStore.open({ dir: await tempDir('replay-store-'), windowMs: 60_000 }),
);

const T0 = new Date('2030-06-15T12:00:00.000Z').getTime();
const WINDOW = 1_000;

/** Opens the journal store in `dir` with a short window (the caller closes it). */
async function openAt(dir: string): Promise<MemoryReplayStore> {
  return MemoryReplayStore.open({ dir, windowMs: WINDOW });
}

const journal = (dir: string, name: 'claims.log') => readFile(join(dir, name), 'utf8').catch(() => '');

describe('MemoryReplayStore journal', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  function fakeClock(at: number) {
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(at);
  }

  it('a claim survives close and reopen of the same directory', async () => {
    const dir = await tempDir('replay-store-');
    const jti = nanoid();
    const first = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    expect(await claim(first, jti, Date.now() + 60_000)).toBe(true);
    await first.close();

    const second = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    try {
      expect(await used(second, jti)).toBe(true);
      expect(await claim(second, jti, Date.now() + 60_000)).toBe(false);
    } finally {
      await second.close();
    }
  });

  it('ranges, releases and counts survive a restart; the reopened store goes on from them', async () => {
    const dir = await tempDir('replay-store-');
    const jti = nanoid();
    const keepUntil = Date.now() + 60_000;
    const first = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    expect((await first.reserve(jti, 0, 1_000, keepUntil, LIMITS)).ok).toBe(true);
    await first.release(jti, 300, 1_000, 600, 0);
    expect((await first.reserve(jti, 300, 500, keepUntil, LIMITS)).ok).toBe(true);
    await first.close();

    const second = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    try {
      expect(await second.usage(jti)).toEqual({ ranges: [0, 500], bytes: 600, responses: 2 });
      expect(await second.reserve(jti, 499, 600, keepUntil, LIMITS)).toEqual({
        ok: false,
        refusal: 'overlap',
      });
      expect((await second.reserve(jti, 500, 1_000, keepUntil, LIMITS)).ok).toBe(true);
    } finally {
      await second.close();
    }
  });

  it('a reservation given back whole stays given back after a restart (the last line of a jti wins)', async () => {
    const dir = await tempDir('replay-store-');
    const jti = nanoid();
    const keepUntil = Date.now() + 60_000;
    const first = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    expect((await first.reserve(jti, 0, 1_000, keepUntil, LIMITS)).ok).toBe(true);
    await first.release(jti, 0, 1_000, 1_000, 1);
    await first.close();

    const second = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    try {
      expect(await second.usage(jti)).toBeUndefined();
      expect((await second.reserve(jti, 0, 1_000, keepUntil, LIMITS)).ok).toBe(true);
    } finally {
      await second.close();
    }
  });

  it('a claim survives any number of restarts while it is still live', async () => {
    // Supervisors restart crash-looping processes quickly: every restart within a token's
    // lifetime must still know the token was used.
    fakeClock(T0);
    const dir = await tempDir('replay-store-');
    const jti = nanoid();
    const store = await openAt(dir);
    expect(await claim(store, jti, T0 + WINDOW)).toBe(true);
    await store.close();

    for (let restart = 1; restart <= 5; restart++) {
      vi.setSystemTime(T0 + restart * 10);
      const again = await openAt(dir);
      const claimed = await used(again, jti);
      await again.close();
      expect(claimed, `restart ${restart}`).toBe(true);
    }
  });

  it('compaction after windowMs keeps the live claims and drops expired ones, in memory and on disk', async () => {
    fakeClock(T0);
    const dir = await tempDir('replay-store-');
    const store = await openAt(dir);
    const [old, late, mid] = [nanoid(), nanoid(), nanoid()];

    vi.setSystemTime(T0 + 100);
    expect(await claim(store, old, T0 + 1_100)).toBe(true);
    vi.setSystemTime(T0 + 900);
    expect(await claim(store, late, T0 + 1_900)).toBe(true);
    expect(await journal(dir, 'claims.log')).toContain(old);
    // More than a window since the journal was compacted: this claim compacts it.
    vi.setSystemTime(T0 + 1_200);
    expect(await claim(store, mid, T0 + 2_200)).toBe(true);

    const onDisk = await journal(dir, 'claims.log');
    expect(onDisk).not.toContain(old);
    expect(onDisk).toContain(late);
    expect(onDisk).toContain(mid);
    expect(await used(store, old)).toBe(false); // expired
    expect(await used(store, late)).toBe(true);
    expect(await used(store, mid)).toBe(true);
    await store.close();

    // Both live claims come back after a restart.
    vi.setSystemTime(T0 + 1_300);
    const reopened = await openAt(dir);
    try {
      expect(await used(reopened, late)).toBe(true);
      expect(await used(reopened, mid)).toBe(true);
      expect(await used(reopened, old)).toBe(false);
    } finally {
      await reopened.close();
    }
  });

  it('a claim in flight when another claim starts a rotation is still journalled', async () => {
    fakeClock(T0);
    const dir = await tempDir('replay-store-');
    const store = await openAt(dir);
    const [first, second] = [nanoid(), nanoid()];
    try {
      vi.setSystemTime(T0 + 900);
      const inFlight = claim(store, first, T0 + 1_900);
      // The clock crosses the window boundary before the first claim reaches its write.
      vi.setSystemTime(T0 + 1_100);
      const rotating = claim(store, second, T0 + 2_100);
      const results = await Promise.allSettled([inFlight, rotating]);
      expect(results).toEqual([
        { status: 'fulfilled', value: true },
        { status: 'fulfilled', value: true },
      ]);
    } finally {
      await store.close();
    }
    const reopened = await openAt(dir);
    try {
      expect(await used(reopened, first)).toBe(true);
      expect(await used(reopened, second)).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('200 concurrent claims (written in batches): each resolves only once its line is on disk', async () => {
    const dir = await tempDir('replay-store-');
    const store = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    const jtis = Array.from({ length: 200 }, () => nanoid());
    const onDiskWhenResolved = new Map<string, boolean>();
    try {
      await Promise.all(
        jtis.map(async (jti) => {
          expect(await claim(store, jti, Date.now() + 60_000)).toBe(true);
          // Read at once, synchronously: nothing else gets to run between the claim and the check.
          onDiskWhenResolved.set(jti, readFileSync(join(dir, 'claims.log'), 'utf8').includes(`${jti} `));
        }),
      );
    } finally {
      await store.close();
    }
    expect([...onDiskWhenResolved.values()].every(Boolean)).toBe(true);
    expect(onDiskWhenResolved.size).toBe(jtis.length);
    const lines = (await journal(dir, 'claims.log')).split('\n').filter(Boolean);
    expect(lines.map((line) => line.split(' ')[0]).sort()).toEqual([...jtis].sort());
  });

  it('expired claims are not reloaded', async () => {
    fakeClock(T0);
    const dir = await tempDir('replay-store-');
    const jti = nanoid();
    const store = await openAt(dir);
    await claim(store, jti, T0 + 50);
    await store.close();

    vi.setSystemTime(T0 + 100);
    const reopened = await openAt(dir);
    try {
      expect(await used(reopened, jti)).toBe(false);
    } finally {
      await reopened.close();
    }
  });

  it('a torn last line (crash mid-write) does not stop the store from opening', async () => {
    const dir = await tempDir('replay-store-');
    const jti = nanoid();
    const store = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    await claim(store, jti, Date.now() + 60_000);
    await store.close();
    await appendFile(join(dir, 'claims.log'), `${nanoid()} 17`); // no newline, truncated number

    const reopened = await MemoryReplayStore.open({ dir, windowMs: 60_000 });
    try {
      expect(await used(reopened, jti)).toBe(true);
      expect(await claim(reopened, nanoid(), Date.now() + 60_000)).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('the journal is readable by the owner only (0600), also after compaction', async () => {
    fakeClock(T0);
    const dir = await tempDir('replay-store-');
    const store = await openAt(dir);
    try {
      await claim(store, nanoid(), T0 + 1_000);
      expect(((await stat(join(dir, 'claims.log'))).mode & 0o777).toString(8)).toBe('600');
      vi.setSystemTime(T0 + 1_500); // compacts
      await claim(store, nanoid(), T0 + 2_500);
      expect(((await stat(join(dir, 'claims.log'))).mode & 0o777).toString(8)).toBe('600');
    } finally {
      await store.close();
    }
  });

  it('refuses to open a journal it cannot read, and leaves it alone (only ENOENT means empty)', async () => {
    const dir = await tempDir('replay-store-');
    // An unreadable claims.log (here a symbolic link loop: ELOOP, as root reads through any
    // file mode): read as empty and rewritten, it would make every used token valid again.
    await symlink('claims.log', join(dir, 'claims.log'));
    await expect(openAt(dir)).rejects.toThrow(/Cannot read the replay journal/);
    expect((await lstat(join(dir, 'claims.log'))).isSymbolicLink()).toBe(true);
  });

  it('a failed compaction is retried, claims go on meanwhile, and ping (readyz) says so', async () => {
    fakeClock(T0);
    const dir = await tempDir('replay-store-');
    const store = await openAt(dir);
    try {
      const used = nanoid();
      expect(await claim(store, used, T0 + 10_000)).toBe(true);
      // The compaction's temporary file cannot be written.
      await mkdir(join(dir, 'claims.log.tmp'));
      vi.setSystemTime(T0 + 1_500); // due: this claim starts a compaction, which fails
      expect(await claim(store, nanoid(), T0 + 10_000)).toBe(true);
      await expect(store.ping()).rejects.toThrow(/replay journal/);
      // Later claims still work (and are journalled), not 503 for ever.
      const during = nanoid();
      expect(await claim(store, during, T0 + 10_000)).toBe(true);
      expect(await claim(store, used, T0 + 10_000)).toBe(false);

      // The obstacle goes; a claim after the retry delay compacts, and the store is ready again.
      await rm(join(dir, 'claims.log.tmp'), { recursive: true });
      vi.setSystemTime(T0 + 3_000);
      expect(await claim(store, nanoid(), T0 + 10_000)).toBe(true);
      await store.ping();
      const lines = await journal(dir, 'claims.log');
      expect(lines).toContain(used);
      expect(lines).toContain(during);
    } finally {
      await store.close();
    }
  });
});

describe('MemoryReplayStore lock', () => {
  it('a second store on the same folder (a second B on one DATA_DIR) is refused, naming REDIS_URL', async () => {
    const dir = await tempDir('replay-lock-');
    const first = await openAt(dir);
    await expect(openAt(dir)).rejects.toThrow(
      /Another download server \(B\) uses the replay journal.*REDIS_URL/,
    );
    // Still the only writer: its claims work, and once it is closed the folder is free again.
    expect(await claim(first, 'jti-1', Date.now() + 60_000)).toBe(true);
    await first.close();
    const second = await openAt(dir);
    expect(await used(second, 'jti-1')).toBe(true);
    await second.close();
  });
});
