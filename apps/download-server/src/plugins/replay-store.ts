import fp from 'fastify-plugin';
import { MemoryReplayStore } from '../single-use/memory-store.ts';
import { type AcceptanceOptions, type ReplayStore, replayWindowMs, SingleUse } from '../single-use/policy.ts';
import { RedisReplayStore } from '../single-use/redis-store.ts';

declare module 'fastify' {
  interface FastifyInstance {
    /** Where B remembers what each token has yielded (readiness, tests). */
    replayStore: ReplayStore;
    /** One download per token: what the download route asks. */
    singleUse: SingleUse;
  }
}

export interface ReplayStoreOptions extends AcceptanceOptions {
  redis?: { url: string; keyPrefix: string; timeoutMs: number; allowEviction: boolean };
  /** Journal folder of the in-memory store (claims survive restarts); none: memory only. */
  journalDir?: string;
  /** RESEND_MARGIN_BYTES. */
  resendMarginBytes: number;
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
          windowMs: replayWindowMs(options),
          log: app.log,
          ...(options.journalDir ? { dir: options.journalDir } : {}),
        });
    app.decorate('replayStore', store);
    app.decorate(
      'singleUse',
      new SingleUse(store, {
        maxTokenAgeSeconds: options.maxTokenAgeSeconds,
        clockToleranceSeconds: options.clockToleranceSeconds,
        resendMarginBytes: options.resendMarginBytes,
      }),
    );
    app.addHook('onClose', () => store.close());
  },
  { name: 'replay-store' },
);
