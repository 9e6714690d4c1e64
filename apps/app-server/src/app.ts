import fastifyMultipart from '@fastify/multipart';
import { storagePlugin } from '@sfh/storage/fastify';
import Fastify, { type FastifyInstance } from 'fastify';
import type { AppConfig } from './config.ts';
import db from './plugins/db.ts';
import errorHandler from './plugins/error-handler.ts';
import keys from './plugins/keys.ts';
import repositories from './plugins/repositories.ts';
import session from './plugins/session.ts';
import authRoutes from './routes/auth.ts';
import fileRoutes from './routes/files.ts';
import healthRoutes from './routes/health.ts';
import jwksRoutes from './routes/jwks.ts';

// Every replica picks up a new current key within this.
const KEY_POLL_MS = 2_000;

export interface BuildOptions {
  /** Postgres connection string (server.ts starts the embedded database when none is configured). */
  databaseUrl: string;
  /** Comma-separated cookie secrets (server.ts supplies a generated one in development). */
  sessionSecret: string;
}

/** Server A. Takes its whole configuration as arguments and never reads `process.env`. */
export async function buildApp(config: AppConfig, options: BuildOptions): Promise<FastifyInstance> {
  const app = Fastify({
    logger: { level: config.LOG_LEVEL },
    trustProxy: config.TRUST_PROXY,
  });

  await app.register(errorHandler);
  await app.register(db, { databaseUrl: options.databaseUrl, poolMax: config.DATABASE_POOL_MAX });
  await app.register(repositories);
  await app.register(storagePlugin, { dir: config.storageDir });
  await app.register(session, {
    secret: options.sessionSecret,
    maxAgeSeconds: config.SESSION_MAX_AGE_SECONDS,
    production: config.NODE_ENV === 'production',
  });
  await app.register(keys, {
    issuer: config.APP_PUBLIC_URL,
    audience: config.DOWNLOAD_PUBLIC_URL,
    ttlSeconds: config.TOKEN_TTL_SECONDS,
    policy: config.keyPolicy,
    kek: config.kek,
    pollMs: KEY_POLL_MS,
  });
  await app.register(fastifyMultipart);

  await app.register(healthRoutes);
  await app.register(jwksRoutes, { refreshSeconds: config.JWKS_REFRESH_SECONDS });
  await app.register(authRoutes, {
    passwordCost: { memoryKib: config.ARGON2_MEMORY_KIB, timeCost: config.ARGON2_TIME_COST },
  });
  await app.register(fileRoutes, {
    maxUploadBytes: config.MAX_UPLOAD_BYTES,
    downloadOrigin: config.DOWNLOAD_PUBLIC_URL,
  });
  return app;
}
