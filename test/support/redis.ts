import type { ChildProcess } from 'node:child_process';
import { Redis } from 'ioredis';
import { onTestFinished } from 'vitest';
import { killRedis, spawnRedis } from './redis-server.ts';

export { killRedis };

/**
 * A throwaway redis-server on `port`, for outages that are real: no persistence, so a restart
 * starts empty. Killed when the test that started it ends, if it has not been killed before.
 */
export async function startRedis(port: number, extraArgs: string[] = []): Promise<ChildProcess> {
  const child = await spawnRedis(port, { extraArgs });
  onTestFinished(() => killRedis(child));
  return child;
}

/** Whether a Redis answers PING at `url` within a second. */
export async function redisAnswers(url: string): Promise<boolean> {
  const client = new Redis(url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    retryStrategy: () => null,
    connectTimeout: 1_000,
    commandTimeout: 1_000,
  });
  client.on('error', () => {});
  try {
    await client.connect();
    await client.ping();
    return true;
  } catch {
    return false;
  } finally {
    client.disconnect();
  }
}
