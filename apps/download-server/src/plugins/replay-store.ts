import fp from 'fastify-plugin';
import { RedisReplayStore } from '../redis-replay-store.ts';
import { MemoryReplayStore, type ReplayStore } from '../replay-store.ts';

declare module 'fastify' {
  interface FastifyInstance {
    replayStore: ReplayStore;
  }
}

export interface ReplayStoreOptions {
  redis?: { url: string; keyPrefix: string; timeoutMs: number; allowEviction: boolean };
  /** Journal folder of the in-memory store (claims survive restarts); none: memory only. */
  journalDir?: string;
  /** The longest a used token stays recorded (acceptance.ts `replayWindowMs`). */
  windowMs: number;
}

/** Where B remembers used tokens: Redis when B runs as several replicas, else memory. */
export default fp(
  async (app, options: ReplayStoreOptions) => {
    const store: ReplayStore = options.redis
      ? await RedisReplayStore.open({
          url: options.redis.url,
          keyPrefix: options.redis.keyPrefix,
          commandTimeoutMs: options.redis.timeoutMs,
          requireNoEviction: !options.redis.allowEviction,
          log: app.log,
        })
      : await MemoryReplayStore.open({
          windowMs: options.windowMs,
          log: app.log,
          ...(options.journalDir ? { dir: options.journalDir } : {}),
        });
    app.decorate('replayStore', store);
    app.addHook('onClose', () => store.close());
  },
  { name: 'replay-store' },
);
