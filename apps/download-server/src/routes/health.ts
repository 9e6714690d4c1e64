import type { FastifyInstance } from 'fastify';

export default async function healthRoutes(app: FastifyInstance) {
  app.get('/healthz', async () => ({ status: 'ok' }));

  /** Ready when B can verify tokens and remember them; otherwise 503 naming what is missing. */
  app.get('/readyz', async (_request, reply) => {
    const keys = app.keys.status();
    const replayStore = await app.replayStore.ping().then(
      () => true,
      () => false,
    );
    const missing = [...(keys.usable ? [] : ['keys']), ...(replayStore ? [] : ['replay-store'])];
    return reply.code(missing.length ? 503 : 200).send({
      status: missing.length ? 'unavailable' : 'ready',
      missing,
      keys: {
        count: keys.keys,
        fetchedAt: keys.fetchedAt?.toISOString() ?? null,
        // Serving on the last good set while the source is unreachable (until JWKS_MAX_STALE_SECONDS).
        stale: keys.stale,
        lastError: keys.lastError ?? null,
      },
    });
  });
}
