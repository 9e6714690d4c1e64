import type { FastifyInstance } from 'fastify';

export default async function healthRoutes(app: FastifyInstance) {
  app.get('/healthz', async () => ({ status: 'ok' }));

  /**
   * Ready when B can verify tokens, remember them and read the bytes; otherwise 503 naming what
   * is missing.
   */
  app.get('/readyz', async (_request, reply) => {
    const keys = app.keys.status();
    const answers = (check: Promise<void>) =>
      check.then(
        () => true,
        () => false,
      );
    const [replayStore, storage] = await Promise.all([
      answers(app.replayStore.ping()),
      answers(app.storage.check()),
    ]);
    const missing = [
      ...(keys.usable ? [] : ['keys']),
      ...(replayStore ? [] : ['replay-store']),
      ...(storage ? [] : ['storage']),
    ];
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
