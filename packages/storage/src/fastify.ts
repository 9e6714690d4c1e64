import fp from 'fastify-plugin';
import { LocalDiskStore, type ObjectStore } from './index.ts';
import type { S3StoreOptions } from './s3.ts';

declare module 'fastify' {
  interface FastifyInstance {
    storage: ObjectStore;
  }
}

/**
 * Decorates `app.storage`: the bucket when `s3` is given, otherwise the local-disk store on `dir`
 * (a volume A writes and B reads).
 */
export const storagePlugin = fp(
  async (app, options: { dir: string; s3?: S3StoreOptions | undefined }) => {
    // The AWS SDK is loaded only when it is used: a local-disk deployment never pays for it.
    const storage: ObjectStore = options.s3
      ? new (await import('./s3.ts')).S3Store(options.s3)
      : new LocalDiskStore(options.dir);
    app.decorate('storage', storage);
    app.addHook('onClose', () => storage.close());
  },
  { name: 'storage' },
);
