import { LocalDiskStore, type ObjectStore } from '@sfh/storage';
import fp from 'fastify-plugin';

declare module 'fastify' {
  interface FastifyInstance {
    storage: ObjectStore;
  }
}

/** File bytes, on the volume A and B share. */
export default fp(
  async (app, options: { dir: string }) => {
    app.decorate('storage', new LocalDiskStore(options.dir));
  },
  { name: 'storage' },
);
