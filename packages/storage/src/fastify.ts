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
    app.decorate('storage', new LocalDiskStore(options.dir));
  },
  { name: 'storage' },
);
