import type { FastifyInstance } from 'fastify';

/** `GET /docs/json`: the OpenAPI 3 description @fastify/swagger builds from the routes' schemas. */
export default async function docsRoutes(app: FastifyInstance) {
  app.get('/docs/json', { schema: { hide: true } }, async () => app.swagger());
}
