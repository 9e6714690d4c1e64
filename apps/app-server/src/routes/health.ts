import type { FastifyInstance } from 'fastify';
import { DatabaseUnavailable } from '../errors.ts';

export default async function healthRoutes(app: FastifyInstance) {
  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async () => {
    try {
      await app.db.query('SELECT 1');
    } catch (error) {
      throw new DatabaseUnavailable({ cause: error });
    }
    return { status: 'ready' };
  });
}
