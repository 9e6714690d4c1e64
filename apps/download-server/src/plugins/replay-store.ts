import fp from 'fastify-plugin';
import { MemoryReplayStore, type ReplayStore } from '../replay-store.ts';

declare module 'fastify' {
  interface FastifyInstance {
    replayStore: ReplayStore;
  }
}

export interface ReplayStoreOptions {
  /** Journal folder of the in-memory store (claims survive restarts); none: memory only. */
  journalDir?: string;
  /** The longest a token can stay acceptable: maximum age plus twice the clock tolerance. */
  windowMs: number;
}

/** Where B remembers used tokens. */
export default fp(
  async (app, options: ReplayStoreOptions) => {
    const store = await MemoryReplayStore.open({
      windowMs: options.windowMs,
      ...(options.journalDir ? { dir: options.journalDir } : {}),
    });
    app.decorate('replayStore', store);
    app.addHook('onClose', () => store.close());
  },
  { name: 'replay-store' },
);
