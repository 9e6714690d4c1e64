import type { FastifyInstance } from 'fastify';
import type { QueryConfig } from 'pg';
import { DatabaseUnavailable } from '../errors.ts';

export default async function healthRoutes(app: FastifyInstance) {
  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async () => {
    try {
      // Its own short timeout: a frozen database must not hold readiness probes for 30 s.
      // (pg reads `query_timeout` per query; its types do not list it.)
      await app.db.query({ text: 'SELECT 1', query_timeout: 2_000 } as QueryConfig);
    } catch (error) {
      throw new DatabaseUnavailable({ cause: error });
    }
    // Uploads need the object store (a bucket may be down while the database is up).
    await app.storage.check();
    return { status: 'ready' };
  });
}
