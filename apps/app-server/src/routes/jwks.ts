import type { FastifyInstance } from 'fastify';

/** A's public keys, for B. Public members only; the private halves never leave the database. */
export default async function jwksRoutes(app: FastifyInstance, options: { refreshSeconds: number }) {
  app.get('/.well-known/jwks.json', async (_request, reply) => {
    // No cache may hold the set longer than B's refresh interval, or a revoked key would outlive it.
    reply.header('cache-control', `public, max-age=${options.refreshSeconds}`);
    return app.tokens.jwks();
  });
}
