import { logging } from '@sfh/logging';
import { storagePlugin } from '@sfh/storage/fastify';
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import type { DestinationStream } from 'pino';
import type { DownloadConfig } from './config.ts';
import errorHandler from './plugins/error-handler.ts';
import keys from './plugins/keys.ts';
import metrics from './plugins/metrics.ts';
import replayStore from './plugins/replay-store.ts';
import downloadRoutes from './routes/download.ts';
import healthRoutes from './routes/health.ts';

const DEFENSIVE_HEADERS = {
  'cache-control': 'private, no-store',
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  'content-security-policy': "default-src 'none'; sandbox",
};

// Tokens are bearer credentials: no log line may carry one, whatever the URL looks like. A
// request the router sent to the download handler is logged by its route (`/%64/<token>` is
// `/d/<token>` to the router); and every URL loses what is shaped like a JWS (three base64url
// segments), percent-encoded or not, wherever it stands (`//d/<token>`, `/x/<token>`).
const JWS_SHAPED = /[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*/g;
// (Only the download routes have a `token` parameter: asking the router's `routeOptions` instead
// would build an object of a dozen fields for every log line.)
function redactToken(request: FastifyRequest): string {
  const params = request.params as { token?: string; name?: string } | undefined;
  let url = request.url ?? '';
  if (params?.token !== undefined) url = `/d/[token]${params.name === undefined ? '' : `/${params.name}`}`;
  try {
    url = decodeURIComponent(url);
  } catch {
    // Not valid percent-encoding: redact it as it is.
  }
  return url.replace(JWS_SHAPED, '[token]').replace(/^\/d\/[^/?]*/, '/d/[token]');
}

export interface BuildOptions {
  /** Where JSON log lines go (default: stdout, a write per line). */
  logStream?: DestinationStream;
}

/** Server B. Stateless apart from the replay store; holds no sessions and opens no database. */
export async function buildApp(config: DownloadConfig, options: BuildOptions = {}): Promise<FastifyInstance> {
  const app = Fastify({
    ...logging(
      'download',
      config,
      { req: (req: FastifyRequest) => ({ method: req.method, url: redactToken(req) }) },
      options.logStream,
    ),
    // Tokens travel in the path. Node refuses request heads over 16 KiB (431) anyway, so no URL
    // the server accepts can hit the router's limit (414): long tokens reach the handler and get
    // 400 TOKEN_MALFORMED.
    routerOptions: { maxParamLength: 16 * 1024 },
    // Slowloris: a client gets REQUEST_TIMEOUT_SECONDS to send its request head, and a connection
    // on which nothing moves for IDLE_TIMEOUT_SECONDS is closed. A slow download keeps moving, so
    // it is never cut. Node checks these every second instead of every 30.
    requestTimeout: config.REQUEST_TIMEOUT_SECONDS * 1000,
    connectionTimeout: config.IDLE_TIMEOUT_SECONDS * 1000,
    http: { connectionsCheckingInterval: 1000 },
  });
  app.server.headersTimeout = config.REQUEST_TIMEOUT_SECONDS * 1000;

  // The same defensive headers on every answer, errors included.
  app.addHook('onRequest', (_request, reply, done) => {
    reply.headers(DEFENSIVE_HEADERS);
    done();
  });

  await app.register(errorHandler, { appOrigin: config.APP_PUBLIC_URL });
  await app.register(storagePlugin, { dir: config.storageDir, s3: config.s3 });
  await app.register(keys, {
    source: config.jwksSource,
    refreshSeconds: config.JWKS_REFRESH_SECONDS,
    maxStaleSeconds: config.JWKS_MAX_STALE_SECONDS,
  });
  await app.register(replayStore, {
    ...(config.REDIS_URL && {
      redis: {
        url: config.REDIS_URL,
        keyPrefix: config.REDIS_KEY_PREFIX,
        timeoutMs: config.REDIS_TIMEOUT_MS,
        allowEviction: config.REDIS_ALLOW_EVICTION,
      },
    }),
    journalDir: `${config.DATA_DIR}/replay`,
    maxTokenAgeSeconds: config.TOKEN_MAX_AGE_SECONDS,
    clockToleranceSeconds: config.CLOCK_TOLERANCE_SECONDS,
    resendMarginBytes: config.RESEND_MARGIN_BYTES,
  });
  await app.register(metrics);
  await app.register(healthRoutes);
  await app.register(downloadRoutes, {
    verify: {
      issuer: config.APP_PUBLIC_URL,
      audience: config.DOWNLOAD_PUBLIC_URL,
      maxTokenAgeSeconds: config.TOKEN_MAX_AGE_SECONDS,
      clockToleranceSeconds: config.CLOCK_TOLERANCE_SECONDS,
    },
  });
  return app;
}
