import helmet from '@fastify/helmet';
import fastifyMultipart from '@fastify/multipart';
import swagger from '@fastify/swagger';
import { logging } from '@sfh/logging';
import { storagePlugin } from '@sfh/storage/fastify';
import Fastify, { type FastifyInstance } from 'fastify';
import type { AppConfig } from './config.ts';
import db from './plugins/db.ts';
import errorHandler from './plugins/error-handler.ts';
import keys from './plugins/keys.ts';
import metrics from './plugins/metrics.ts';
import objectDeletions from './plugins/object-deletions.ts';
import passwords from './plugins/passwords.ts';
import repositories from './plugins/repositories.ts';
import session from './plugins/session.ts';
import authRoutes from './routes/auth.ts';
import docsRoutes from './routes/docs.ts';
import fileRoutes from './routes/files.ts';
import healthRoutes from './routes/health.ts';
import jwksRoutes from './routes/jwks.ts';
import pageRoutes from './routes/pages.ts';
import sessionRoutes from './routes/sessions.ts';
import { publicShareRoutes, shareOwnerRoutes } from './routes/shares.ts';

// Every replica picks up a new current key within this.
const KEY_POLL_MS = 2_000;

export interface BuildOptions {
  /** Postgres connection string (server.ts starts the embedded database when none is configured). */
  databaseUrl: string;
  /** Comma-separated cookie secrets (server.ts supplies a generated one in development). */
  sessionSecret: string;
  /** Where JSON log lines go (default: stdout). */
  logStream?: Parameters<typeof logging>[3];
}

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * The path prefix of `APP_PUBLIC_URL` ('' without one): A behind a proxy that strips it
     * puts it in front of every link and redirect of its pages.
     */
    publicPath: string;
  }
}

/** Server A. Takes its whole configuration as arguments and never reads `process.env`. */
export async function buildApp(config: AppConfig, options: BuildOptions): Promise<FastifyInstance> {
  const app = Fastify({
    ...logging(
      'app',
      config,
      {
        // Paths without query strings: the no-JavaScript upload form carries its CSRF token there.
        req: (req) => ({
          method: req.method,
          url: req.url?.split('?')[0],
          remoteAddress: req.ip,
        }),
      },
      options.logStream,
    ),
    trustProxy: config.trustProxy,
    // Slowloris, as on B: REQUEST_TIMEOUT_SECONDS for the request head, IDLE_TIMEOUT_SECONDS for a
    // connection on which nothing moves. Node checks these every second instead of every 30.
    connectionTimeout: config.IDLE_TIMEOUT_SECONDS * 1000,
    http: { connectionsCheckingInterval: 1000 },
  });
  app.server.headersTimeout = config.REQUEST_TIMEOUT_SECONDS * 1000;
  // And a deadline for the body: REQUEST_TIMEOUT_SECONDS for a form or JSON (a few kB),
  // UPLOAD_TIMEOUT_SECONDS for an upload. One byte now and then keeps a connection from being
  // idle, so without it a trickled body stays open for good, also after A has answered early
  // (a refused upload whose bytes keep coming).
  app.addHook('onRequest', async (request) => {
    if (request.raw.complete) return;
    const upload = request.headers['content-type']?.startsWith('multipart/form-data');
    const seconds = upload ? config.UPLOAD_TIMEOUT_SECONDS : config.REQUEST_TIMEOUT_SECONDS;
    const timer = setTimeout(() => {
      if (!request.raw.complete) request.raw.destroy();
    }, seconds * 1000);
    timer.unref();
    request.raw.once('end', () => clearTimeout(timer)).once('close', () => clearTimeout(timer));
  });

  app.decorate('publicPath', new URL(config.APP_PUBLIC_URL).pathname.replace(/\/$/, ''));
  await app.register(errorHandler);
  await app.register(db, { databaseUrl: options.databaseUrl, poolMax: config.DATABASE_POOL_MAX });
  await app.register(repositories);
  await app.register(passwords, {
    cost: { memoryKib: config.ARGON2_MEMORY_KIB, timeCost: config.ARGON2_TIME_COST },
    work: { concurrency: config.ARGON2_CONCURRENCY, queueMax: config.ARGON2_QUEUE_MAX },
  });
  await app.register(metrics, { sessionIdleSeconds: config.SESSION_IDLE_TIMEOUT_SECONDS });
  await app.register(storagePlugin, { dir: config.storageDir, s3: config.s3 });
  await app.register(objectDeletions, { sweepSeconds: config.OBJECT_DELETE_RETRY_SECONDS });
  await app.register(helmet, {
    // A's pages load nothing from elsewhere and run no inline script.
    contentSecurityPolicy: {
      directives: {
        defaultSrc: ["'self'"],
        scriptSrc: ["'self'"],
        styleSrc: ["'self'"],
        imgSrc: ["'self'", 'data:'],
        objectSrc: ["'none'"],
        baseUri: ["'none'"],
        frameAncestors: ["'none'"],
        // Signing in with `next=/files/:id/download` ends in a redirect to B, and browsers apply
        // form-action to every redirect after a form post.
        formAction: ["'self'", new URL(config.DOWNLOAD_PUBLIC_URL).origin],
        // B is another origin: downloads are navigations there, not fetches from A's pages.
        connectSrc: ["'self'"],
        upgradeInsecureRequests: config.NODE_ENV === 'production' ? [] : null,
      },
    },
    referrerPolicy: { policy: 'same-origin' },
    strictTransportSecurity: config.NODE_ENV === 'production',
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
  // Before any route: it describes every route registered after it, from the route's own schema.
  await app.register(swagger, {
    // A behind a prefix never sees it (the proxy strips it): paths stay as A routes them.
    stripBasePath: false,
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'Split file hosting: app server (A)',
        description: 'JSON API of A. State-changing requests need the session cookie and x-csrf-token.',
        version: '1',
      },
      servers: [{ url: config.APP_PUBLIC_URL }],
    },
  });

  const authOptions = {
    throttle: {
      maxPerAccount: config.LOGIN_MAX_FAILURES_PER_ACCOUNT,
      maxPerIp: config.LOGIN_MAX_FAILURES_PER_IP,
      windowSeconds: config.LOGIN_WINDOW_SECONDS,
    },
    registrationsPerIpPerHour: config.REGISTRATIONS_PER_IP_PER_HOUR,
  };
  const fileOptions = {
    maxUploadBytes: config.MAX_UPLOAD_BYTES,
    quotaBytes: config.USER_QUOTA_BYTES,
    downloadOrigin: config.DOWNLOAD_PUBLIC_URL,
    mintRatePerMinute: config.MINT_RATE_PER_MINUTE,
    uploadTimeoutSeconds: config.UPLOAD_TIMEOUT_SECONDS,
  };
  const shareOptions = {
    appPublicUrl: config.APP_PUBLIC_URL,
    downloadOrigin: config.DOWNLOAD_PUBLIC_URL,
    mintBudget: {
      perShare: config.SHARE_MINT_RATE_PER_MINUTE,
      perOwner: config.SHARE_MINT_RATE_PER_OWNER_PER_MINUTE,
    },
    downloadsPerIpPerMinute: config.SHARE_DOWNLOADS_PER_IP_PER_MINUTE,
    passwordThrottle: {
      maxPerIp: config.SHARE_PASSWORD_MAX_FAILURES_PER_IP,
      maxPerShare: config.SHARE_PASSWORD_MAX_FAILURES_PER_SHARE,
      windowSeconds: config.LOGIN_WINDOW_SECONDS,
    },
    creation: {
      perUserPerHour: config.SHARE_CREATIONS_PER_USER_PER_HOUR,
      perIpPerHour: config.SHARE_CREATIONS_PER_IP_PER_HOUR,
      maxLivePerUser: config.MAX_LIVE_SHARES_PER_USER,
      maxLivePerFile: config.MAX_LIVE_SHARES_PER_FILE,
    },
    production: config.NODE_ENV === 'production',
  };
  // What browsers send as Origin: never a path, also when A is served under a prefix.
  const appOrigin = new URL(config.APP_PUBLIC_URL).origin;
  // Share pages and their downloads, for people without an account: a sibling of the scope
  // below, so no session (and no session cookie) exists there at all.
  await app.register(publicShareRoutes, { ...shareOptions, appOrigin });
  // Everything with a session: its cookie, the CSRF checks, sign-in and what needs it.
  await app.register(async (withSession) => {
    await withSession.register(session, {
      secret: options.sessionSecret,
      timeouts: {
        idleSeconds: config.SESSION_IDLE_TIMEOUT_SECONDS,
        absoluteSeconds: config.SESSION_ABSOLUTE_TIMEOUT_SECONDS,
      },
      production: config.NODE_ENV === 'production',
      appOrigin,
    });
    await withSession.register(docsRoutes);
    await withSession.register(healthRoutes);
    await withSession.register(jwksRoutes, { refreshSeconds: config.JWKS_REFRESH_SECONDS });
    await withSession.register(authRoutes, authOptions);
    await withSession.register(sessionRoutes, { idleSeconds: config.SESSION_IDLE_TIMEOUT_SECONDS });
    await withSession.register(fileRoutes, fileOptions);
    await withSession.register(shareOwnerRoutes, shareOptions);
    // The HTML UI, on the same actions as the JSON routes above.
    await withSession.register(pageRoutes, {
      auth: authOptions,
      files: fileOptions,
      shares: shareOptions,
      idleSeconds: config.SESSION_IDLE_TIMEOUT_SECONDS,
      production: config.NODE_ENV === 'production',
    });
  });
  return app;
}
