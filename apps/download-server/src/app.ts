import { LocalDiskStore } from '@sfh/storage';
import Fastify, { type FastifyInstance, LogController } from 'fastify';
import type { DownloadConfig } from './config.ts';
import errorHandler from './plugins/error-handler.ts';
import keys from './plugins/keys.ts';
import replayStore from './plugins/replay-store.ts';
import downloadRoutes from './routes/download.ts';
import healthRoutes from './routes/health.ts';

// Tokens are bearer credentials: no log line may carry one.
const redactToken = (url: string) => url.replace(/^\/d\/[^/?]*/, '/d/[token]');

/** Server B. Stateless apart from the replay store; holds no sessions and opens no database. */
export async function buildApp(config: DownloadConfig): Promise<FastifyInstance> {
  const app = Fastify({
    logger: {
      level: config.LOG_LEVEL,
      serializers: { req: (req) => ({ method: req.method, url: redactToken(req.url ?? '') }) },
    },
    // No per-request log lines on the hot path; errors are still logged.
    logController: new LogController({ disableRequestLogging: true }),
    // Tokens travel in the path. Node refuses request heads over 16 KiB (431) anyway, so no URL
    // the server accepts can hit the router's limit (414): long tokens reach the handler and get
    // 400 TOKEN_MALFORMED.
    routerOptions: { maxParamLength: 16 * 1024 },
  });

  // The same defensive headers on every answer, errors included.
  app.addHook('onRequest', async (_request, reply) => {
    reply.headers({
      'cache-control': 'private, no-store',
      'x-content-type-options': 'nosniff',
      'referrer-policy': 'no-referrer',
      'content-security-policy': "default-src 'none'; sandbox",
    });
  });

  await app.register(errorHandler, { appOrigin: config.APP_PUBLIC_URL });
  await app.register(keys, {
    source: config.jwksSource,
    refreshSeconds: config.JWKS_REFRESH_SECONDS,
    maxStaleSeconds: config.JWKS_MAX_STALE_SECONDS,
  });
  await app.register(replayStore, {
    journalDir: `${config.DATA_DIR}/replay`,
    windowMs: (config.TOKEN_MAX_AGE_SECONDS + 2 * config.CLOCK_TOLERANCE_SECONDS) * 1000,
  });
  await app.register(healthRoutes);
  await app.register(downloadRoutes, {
    storage: new LocalDiskStore(config.storageDir),
    verify: {
      issuer: config.APP_PUBLIC_URL,
      audience: config.DOWNLOAD_PUBLIC_URL,
      maxTokenAgeSeconds: config.TOKEN_MAX_AGE_SECONDS,
      clockToleranceSeconds: config.CLOCK_TOLERANCE_SECONDS,
    },
  });
  return app;
}
