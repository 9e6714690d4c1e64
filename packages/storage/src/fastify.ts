import fp from 'fastify-plugin';
import { LocalDiskStore, type ObjectStore } from './index.ts';

declare module 'fastify' {
  interface FastifyInstance {
    storage: ObjectStore;
  }
}

/** Decorates `app.storage` with the local-disk store on `dir` (the volume A and B share). */
export const storagePlugin = fp(
  async (app, options: { dir: string }) => {
    const storage = new LocalDiskStore(options.dir);
    app.decorate('storage', storage);
    app.addHook('onClose', () => storage.close());
  },
  { name: 'storage' },
);
