/**
 * RedisReplayStore: the shared contract against the Redis of the machine (TEST_REDIS_URL, else
 * 127.0.0.1:6379), then what only Redis can get wrong: the key and its TTL, one winner across
 * two replicas, fail closed while Redis is down or hung and recover without a reopen, start
 * without Redis, and the eviction policy check. Outages are real: each such test runs its own
 * throwaway `redis-server` on a free port and kills it.
 *
 * A developer machine without Redis skips the suite; with CI or TEST_REDIS_URL set, a missing
 * Redis fails it.
 */
import { spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { nanoid } from 'nanoid';
import { beforeAll, describe, expect, it, onTestFinished, vi } from 'vitest';
import { freePort } from '../../../../test/support/processes.ts';
import { killRedis, redisAnswers, startRedis } from '../../../../test/support/redis.ts';
import { skipUnless } from '../../../../test/support/skip.ts';
import {
  POLICY_RECHECK_MS,
  RedisReplayStore,
  type RedisReplayStoreOptions,
} from '../../src/single-use/redis-store.ts';
import { claim, replayStoreContract, used } from './store.contract.ts';

const REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
const REQUIRED = Boolean(process.env.TEST_REDIS_URL || process.env.CI);
const MINUTE = 60_000;
const COMMAND_TIMEOUT_MS = 500;

const REACHABLE = await redisAnswers(REDIS_URL);
const HAS_REDIS_SERVER = spawnSync('redis-server', ['--version']).status === 0;

/** A store with a unique key prefix (its keys expire on their own), closed when the test ends. */
async function openStore(overrides: Partial<RedisReplayStoreOptions> = {}): Promise<RedisReplayStore> {
  const store = await RedisReplayStore.open({
    url: REDIS_URL,
    keyPrefix: `test:${nanoid()}:`,
    commandTimeoutMs: COMMAND_TIMEOUT_MS,
    requireNoEviction: true,
    ...overrides,
  });
  onTestFinished(() => store.close());
  return store;
}

/** A plain client for looking behind the store, closed when the test ends. */
function adminClient(url: string): Redis {
  const client = new Redis(url, { retryStrategy: () => null });
  client.on('error', () => {});
  onTestFinished(() => {
    client.disconnect();
  });
  return client;
}

/** Resolves with how long `promise` took to reject; fails the test if it resolves. */
async function rejectsWithin(promise: Promise<unknown>): Promise<number> {
  const started = performance.now();
  await expect(promise).rejects.toThrow();
  return performance.now() - started;
}

const fakeLog = () => ({ warn: vi.fn(), error: vi.fn() });

const against = skipUnless(
  'RedisReplayStore',
  !REACHABLE && `no Redis answers at ${REDIS_URL} (start redis-server, or set TEST_REDIS_URL)`,
  REQUIRED,
);
describe.skipIf(against.skip)(`RedisReplayStore against ${REDIS_URL}${against.reason}`, () => {
  beforeAll(() => {
    if (!REACHABLE) throw new Error(`Redis does not answer at ${REDIS_URL}; CI and TEST_REDIS_URL need it`);
  });

  replayStoreContract('RedisReplayStore', () => openStore(), { realClock: true });

  it('a record is the hash <keyPrefix><jti> with a TTL ending at keepUntil', async () => {
    const keyPrefix = `test:${nanoid()}:`;
    const store = await openStore({ keyPrefix });
    const admin = adminClient(REDIS_URL);
    const jti = nanoid();
    expect(await claim(store, jti, Date.now() + 30_000)).toBe(true);
    expect(await admin.hgetall(`${keyPrefix}${jti}`)).toEqual({ r: '0-1000', b: '1000', n: '1' });
    const ttl = await admin.pttl(`${keyPrefix}${jti}`);
    expect(ttl).toBeGreaterThan(29_000);
    expect(ttl).toBeLessThanOrEqual(30_000);
  });

  it('a keepUntil already past still claims, for a moment', async () => {
    const store = await openStore();
    const jti = nanoid();
    expect(await claim(store, jti, Date.now() - 1_000)).toBe(true);
    await sleep(20);
    expect(await used(store, jti)).toBe(false);
  });

  it('a release keeps the TTL', async () => {
    const keyPrefix = `test:${nanoid()}:`;
    const store = await openStore({ keyPrefix });
    const admin = adminClient(REDIS_URL);
    const jti = nanoid();
    expect(await claim(store, jti, Date.now() + 30_000)).toBe(true);
    await store.release(jti, 10, 1_000, 990, 0);
    expect(await admin.hgetall(`${keyPrefix}${jti}`)).toEqual({ r: '0-10', b: '10', n: '1' });
    expect(await admin.pttl(`${keyPrefix}${jti}`)).toBeGreaterThan(29_000);
  });

  it('of 200 concurrent reserves of one range through two replicas, exactly one wins', async () => {
    const keyPrefix = `test:${nanoid()}:`;
    const [one, two] = await Promise.all([openStore({ keyPrefix }), openStore({ keyPrefix })]);
    const jti = nanoid();
    const keepUntil = Date.now() + MINUTE;
    const results = await Promise.all(
      Array.from({ length: 200 }, (_, i) => claim(i % 2 ? one : two, jti, keepUntil)),
    );
    expect(results.filter((won) => won)).toHaveLength(1);
    expect(await used(one, jti)).toBe(true);
    expect(await used(two, jti)).toBe(true);
  });

  it('replicas with different key prefixes do not see each other', async () => {
    const [one, two] = await Promise.all([openStore(), openStore()]);
    const jti = nanoid();
    expect(await claim(one, jti, Date.now() + MINUTE)).toBe(true);
    expect(await claim(two, jti, Date.now() + MINUTE)).toBe(true);
  });
});

// These start Redis servers of their own on free ports.
const ownRedis = (suite: string) =>
  skipUnless(suite, !HAS_REDIS_SERVER && 'no redis-server program (apt-get install -y redis-server)');
const fails = ownRedis('RedisReplayStore when Redis fails');
describe.skipIf(fails.skip)(`RedisReplayStore when Redis fails${fails.reason}`, () => {
  it('fails closed while Redis is down and recovers by itself when it returns', async () => {
    const port = await freePort();
    const url = `redis://127.0.0.1:${port}`;
    const server = await startRedis(port);
    const log = fakeLog();
    const store = await openStore({ url, log });
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);

    await killRedis(server);
    const jti = nanoid();
    expect(await rejectsWithin(claim(store, jti, Date.now() + MINUTE))).toBeLessThan(2_000);
    expect(await rejectsWithin(used(store, jti))).toBeLessThan(2_000);
    expect(await rejectsWithin(store.ping())).toBeLessThan(2_000);
    // The socket stops being writable a moment before ioredis emits 'close': the log may trail.
    await vi.waitFor(() =>
      expect(log.warn).toHaveBeenCalledWith(expect.anything(), expect.stringMatching(/unreachable/)),
    );

    // Same port, same store object: no reopen.
    await startRedis(port);
    await vi.waitFor(() => store.ping(), { timeout: 10_000, interval: 100 });
    expect(await claim(store, jti, Date.now() + MINUTE)).toBe(true);
    expect(await claim(store, jti, Date.now() + MINUTE)).toBe(false);
  });

  it('fails closed within the command timeout while Redis hangs, and recovers when it resumes', async () => {
    const port = await freePort();
    const server = await startRedis(port);
    const store = await openStore({ url: `redis://127.0.0.1:${port}` });
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);

    server.kill('SIGSTOP'); // the socket stays open, nothing answers
    try {
      const jti = nanoid();
      const elapsed = await rejectsWithin(claim(store, jti, Date.now() + MINUTE));
      expect(elapsed).toBeGreaterThanOrEqual(COMMAND_TIMEOUT_MS - 50);
      expect(elapsed).toBeLessThan(2_000);
      expect(await rejectsWithin(store.ping())).toBeLessThan(2_000);
    } finally {
      server.kill('SIGCONT');
    }
    await vi.waitFor(() => store.ping(), { timeout: 10_000, interval: 100 });
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);
  });

  it('opens while nothing listens, rejects every call, and starts working when Redis appears', async () => {
    const port = await freePort();
    const log = fakeLog();
    const store = await openStore({ url: `redis://127.0.0.1:${port}`, log });
    const jti = nanoid();
    expect(await rejectsWithin(claim(store, jti, Date.now() + MINUTE))).toBeLessThan(2_000);
    await expect(used(store, jti)).rejects.toThrow();
    await expect(store.ping()).rejects.toThrow();
    expect(log.warn).toHaveBeenCalled();

    await startRedis(port);
    await vi.waitFor(() => store.ping(), { timeout: 10_000, interval: 100 });
    expect(await claim(store, jti, Date.now() + MINUTE)).toBe(true);
  });

  it('close resolves also while Redis is down', async () => {
    const port = await freePort();
    const server = await startRedis(port);
    const store = await openStore({ url: `redis://127.0.0.1:${port}` });
    await killRedis(server);
    await expect(store.close()).resolves.toBeUndefined();
    await expect(claim(store, nanoid(), Date.now() + MINUTE)).rejects.toThrow();
  });
});

const eviction = ownRedis('RedisReplayStore eviction policy');
describe.skipIf(eviction.skip)(`RedisReplayStore eviction policy${eviction.reason}`, () => {
  async function evictingRedis(): Promise<string> {
    const port = await freePort();
    await startRedis(port);
    const url = `redis://127.0.0.1:${port}`;
    await adminClient(url).config('SET', 'maxmemory-policy', 'allkeys-lru');
    return url;
  }

  it('open refuses a Redis that may evict keys when noeviction is required', async () => {
    const url = await evictingRedis();
    await expect(
      RedisReplayStore.open({
        url,
        keyPrefix: 't:',
        commandTimeoutMs: COMMAND_TIMEOUT_MS,
        requireNoEviction: true,
      }),
    ).rejects.toThrow(/maxmemory-policy is allkeys-lru.*noeviction.*REDIS_ALLOW_EVICTION=true/);
  });

  it('open only warns when eviction is allowed', async () => {
    const url = await evictingRedis();
    const log = fakeLog();
    const store = await openStore({ url, requireNoEviction: false, log });
    expect(log.warn).toHaveBeenCalledWith(
      { maxmemoryPolicy: 'allkeys-lru' },
      expect.stringMatching(/maxmemory-policy is allkeys-lru/),
    );
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);
  });

  it('a policy first seen after open fails closed, and clears once ops fix it', async () => {
    const port = await freePort();
    const url = `redis://127.0.0.1:${port}`;
    const log = fakeLog();
    const store = await openStore({ url, log });
    await startRedis(port, ['--maxmemory-policy', 'allkeys-lru']);

    // Connected again, yet every call is refused for the policy.
    await vi.waitFor(
      async () => {
        await expect(claim(store, nanoid(), Date.now() + MINUTE)).rejects.toThrow(/maxmemory-policy/);
      },
      { timeout: 10_000, interval: 100 },
    );
    await expect(store.ping()).rejects.toThrow(/maxmemory-policy/);
    await expect(used(store, nanoid())).rejects.toThrow(/maxmemory-policy/);
    expect(log.error).toHaveBeenCalledWith(
      { maxmemoryPolicy: 'allkeys-lru' },
      expect.stringMatching(/maxmemory-policy is allkeys-lru/),
    );

    await adminClient(url).config('SET', 'maxmemory-policy', 'noeviction');
    await vi.waitFor(() => store.ping(), { timeout: 10_000, interval: 100 });
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);
  });

  it('a policy changed live while B runs is seen at once by ping (readyz), and by claims within the recheck', async () => {
    const port = await freePort();
    await startRedis(port, ['--maxmemory-policy', 'noeviction']);
    const url = `redis://127.0.0.1:${port}`;
    const store = await openStore({ url, log: fakeLog() });
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);

    // No restart, no reconnect: ops (or a managed service) switch the policy live.
    await adminClient(url).config('SET', 'maxmemory-policy', 'allkeys-lru');
    await expect(store.ping()).rejects.toThrow(/maxmemory-policy is allkeys-lru/);
    const changedAt = Date.now();
    await vi.waitFor(
      async () => {
        await expect(claim(store, nanoid(), Date.now() + MINUTE)).rejects.toThrow(/maxmemory-policy/);
      },
      { timeout: POLICY_RECHECK_MS + 2_000, interval: 100 },
    );
    expect(Date.now() - changedAt).toBeLessThanOrEqual(POLICY_RECHECK_MS + 2_000);

    await adminClient(url).config('SET', 'maxmemory-policy', 'noeviction');
    await vi.waitFor(() => store.ping(), { timeout: 5_000, interval: 100 });
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);
  });

  it('a Redis without CONFIG (managed) is trusted with a warning', async () => {
    const port = await freePort();
    await startRedis(port, ['--rename-command', 'CONFIG', '']);
    const log = fakeLog();
    const store = await openStore({ url: `redis://127.0.0.1:${port}`, log });
    expect(log.warn).toHaveBeenCalledWith(expect.anything(), expect.stringMatching(/CONFIG is not allowed/));
    expect(await claim(store, nanoid(), Date.now() + MINUTE)).toBe(true);
  });
});
