import { randomBytes } from 'node:crypto';
import fastifyFormbody from '@fastify/formbody';
import fastifyRateLimit from '@fastify/rate-limit';
import fastifyView from '@fastify/view';
import { displayFileName } from '@sfh/download-token';
import { type Static, Type } from '@sinclair/typebox';
import { Eta } from 'eta';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { CsrfInvalid, InvalidCredentials, NotFound, ShareExpired } from '../errors.ts';
import { type PasswordCost, passwordHasher } from '../passwords.ts';
import type { PublicShare, ShareRecord } from '../repositories/shares.ts';
import { rateLimited } from './auth.ts';
import { IdParams, mintDownload, mintRateLimited } from './files.ts';
import { humanBytes, humanDate, VIEWS_DIR } from './pages.ts';

export const MIN_SHARE_SECONDS = 60;
export const MAX_SHARE_SECONDS = 30 * 24 * 3600;
export const DEFAULT_SHARE_SECONDS = 7 * 24 * 3600;
const SHARE_ID = new RegExp(IdParams.properties.id.pattern as string);
/** Requests one client IP may make to the public share routes per minute, per replica. */
export const PUBLIC_REQUESTS_PER_MINUTE_PER_IP = 120;

// Optional password: 8–1024 characters like account passwords (argon2 takes it whole).
export const NewShare = Type.Object(
  {
    expiresInSeconds: Type.Optional(Type.Integer({ minimum: MIN_SHARE_SECONDS, maximum: MAX_SHARE_SECONDS })),
    // Bounded by Postgres' integer column.
    maxDownloads: Type.Optional(Type.Integer({ minimum: 1, maximum: 2_147_483_647 })),
    password: Type.Optional(Type.String({ minLength: 8, maxLength: 1024 })),
  },
  { additionalProperties: false },
);
export type NewShare = Static<typeof NewShare>;
const SharePassword = Type.Object({ password: Type.Optional(Type.String({ maxLength: 1024 })) });

// Every field is optional: a POST without a body (curl -X POST) means `{}`.
const bodyOptional = async (request: FastifyRequest) => {
  request.body ??= {};
};

export interface SharesOptions {
  /** A's public URL: a share's link is `<appPublicUrl>/s/<id>`. */
  appPublicUrl: string;
  downloadOrigin: string;
  /** The share owner's MINT_RATE_PER_MINUTE (0: no limit). */
  mintRatePerMinute: number;
  passwordCost: PasswordCost;
  /** Wrong share passwords per share and per client IP within the window (sign-in's numbers). */
  throttle: { maxPerShare: number; maxPerIp: number; windowSeconds: number };
  production: boolean;
}

const shareView = (share: ShareRecord, appPublicUrl: string) => ({
  id: share.id,
  url: `${appPublicUrl}/s/${share.id}`,
  fileId: share.fileId,
  fileName: share.fileName,
  expiresAt: share.expiresAt.toISOString(),
  maxDownloads: share.maxDownloads,
  downloads: share.downloads,
  lastDownloadAt: share.lastDownloadAt?.toISOString() ?? null,
  hasPassword: share.hasPassword,
  createdAt: share.createdAt.toISOString(),
  revokedAt: share.revokedAt?.toISOString() ?? null,
});
export type ShareView = ReturnType<typeof shareView>;

/** What an owner does with share links, for the JSON API and the HTML forms alike. */
export function shareActions(
  app: FastifyInstance,
  options: Pick<SharesOptions, 'appPublicUrl' | 'passwordCost'>,
) {
  const passwords = passwordHasher(options.passwordCost);
  return {
    /** Shares the user's file; `NOT_FOUND` if it is not theirs. */
    async create(userId: string, fileId: string, input: NewShare): Promise<ShareView> {
      const share = await app.repos.shares.create({
        // 128 random bits: a link cannot be guessed.
        id: randomBytes(16).toString('base64url'),
        userId,
        fileId,
        passwordHash: input.password === undefined ? null : await passwords.hash(input.password),
        expiresInSeconds: input.expiresInSeconds ?? DEFAULT_SHARE_SECONDS,
        maxDownloads: input.maxDownloads ?? null,
      });
      if (!share) throw new NotFound();
      return shareView(share, options.appPublicUrl);
    },
    async list(userId: string): Promise<ShareView[]> {
      return (await app.repos.shares.listForUser(userId)).map((share) =>
        shareView(share, options.appPublicUrl),
      );
    },
    /** Revokes at once: nothing more is minted; `NOT_FOUND` if it is not the user's share. */
    async revoke(userId: string, shareId: string): Promise<void> {
      if (!(await app.repos.shares.revokeForUser(userId, shareId))) throw new NotFound();
    },
  };
}

/** The owner's share links: create one for a file, list them, revoke one. */
export async function shareOwnerRoutes(app: FastifyInstance, options: SharesOptions) {
  const shares = shareActions(app, options);
  app.addHook('onRequest', app.requireUser);

  app.post<{ Params: IdParams; Body: NewShare }>(
    '/api/files/:id/shares',
    { schema: { params: IdParams, body: NewShare }, preValidation: bodyOptional },
    async (request, reply) =>
      reply.code(201).send({ share: await shares.create(request.userId, request.params.id, request.body) }),
  );

  app.get('/api/shares', async (request) => ({ shares: await shares.list(request.userId) }));

  app.delete<{ Params: IdParams }>(
    '/api/shares/:id',
    { schema: { params: IdParams } },
    async (request, reply) => {
      await shares.revoke(request.userId, request.params.id);
      return reply.code(204).send();
    },
  );
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** A refused form post of the share page shows the page again, saying why. */
    sharePage?: boolean;
  }
}

const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/**
 * The public side of share links, for people without an account: the share page and the two
 * ways to download through it. A sibling of the session's scope, so these routes have no
 * session at all: they never set a cookie, and they need no CSRF token, only a POST from A's own
 * page (or from no browser page at all: curl). Each download is counted in
 * Postgres when its token is minted; a GET (a link scanner, a preview bot) never mints.
 */
export async function publicShareRoutes(
  app: FastifyInstance,
  options: SharesOptions & { appOrigin: string },
) {
  const passwords = passwordHasher(options.passwordCost);
  const { throttle } = options;
  const failures = app.repos.loginFailures;

  // Every public request (page views and downloads alike) is limited per client IP, in each
  // replica's memory: a crawler or a script hammering share links gets 429 long before it can
  // load A. Per share, downloads are bounded by the owner's mint limit and `maxDownloads`, both
  // counted in Postgres for all replicas, and password guesses by checkPassword below.
  await app.register(fastifyRateLimit, {
    max: PUBLIC_REQUESTS_PER_MINUTE_PER_IP,
    timeWindow: 60_000,
    keyGenerator: (request) => request.ip,
    errorResponseBuilder: (_request, context) => {
      app.stats.throttled('share_ip');
      return rateLimited(Date.now() + context.ttl);
    },
  });
  await app.register(fastifyFormbody);
  await app.register(fastifyView, {
    engine: { eta: new Eta({ autoEscape: true }) },
    root: VIEWS_DIR,
    production: options.production,
  });

  // Cross-site form posts would let another site spend a share's downloads in a visitor's
  // browser. The page is no-referrer, so a browser posts its form with `Origin: null`; there
  // Sec-Fetch-Site (sent by every current browser, and not settable by a page) says whether the
  // post came from A's own page. Clients without it (curl) are judged by Origin alone.
  app.addHook('onRequest', async (request) => {
    if (SAFE_METHODS.has(request.method)) return;
    const origin = request.headers.origin;
    const site = request.headers['sec-fetch-site'];
    const fromA =
      site === undefined
        ? origin === undefined || origin === options.appOrigin
        : site === 'same-origin' &&
          (origin === undefined || origin === 'null' || origin === options.appOrigin);
    if (!fromA) throw new CsrfInvalid();
  });
  // Nothing here is for search engines, caches or the Referer of the page a visitor goes to next.
  app.addHook('onSend', async (_request, reply) => {
    reply
      .header('cache-control', 'no-store')
      .header('referrer-policy', 'no-referrer')
      .header('x-robots-tag', 'noindex, nofollow');
  });

  // Wrong passwords are throttled per share and per client IP, in the same Postgres table as
  // sign-in failures (shared by all replicas, one budget per IP for password guesses of every
  // kind). The attempt is recorded before it is counted, so concurrent guesses cannot all pass.
  // A right password costs the same argon2 verification as a wrong one.
  async function checkPassword(request: FastifyRequest, share: PublicShare, password: string) {
    const key = `share:${share.id}`;
    const attempt = await failures.record(key, request.ip, null);
    const recent = await failures.recent(key, request.ip, throttle.windowSeconds);
    const freeAt = Math.max(
      recent.account > throttle.maxPerShare ? (recent.accountFreeAt?.getTime() ?? 0) : 0,
      recent.client > throttle.maxPerIp ? (recent.clientFreeAt?.getTime() ?? 0) : 0,
    );
    if (freeAt > 0) {
      await failures.remove(attempt);
      app.stats.throttled('share_password');
      throw rateLimited(freeAt);
    }
    if (!(await passwords.verify(share.passwordHash ?? undefined, password))) throw new InvalidCredentials();
    await failures.remove(attempt);
  }

  const usable = (share: PublicShare) =>
    share.expiresAt.getTime() > Date.now() &&
    (share.maxDownloads === null || share.downloads < share.maxDownloads);

  /** Counts one download of the share and mints its token; the catalogue error otherwise. */
  async function download(request: FastifyRequest, shareId: string, password: string | undefined) {
    const share = await app.repos.shares.findLive(shareId);
    if (!share) throw new NotFound();
    // Spent or expired: said before any password work (the page shows as much to anyone).
    if (!usable(share)) throw new ShareExpired();
    if (share.passwordHash !== null) await checkPassword(request, share, password ?? '');
    const taken = await app.repos.shares.takeDownload(shareId, options.mintRatePerMinute);
    if (taken.outcome === 'not_found') throw new NotFound();
    if (taken.outcome === 'expired') throw new ShareExpired();
    if (taken.outcome === 'rate_limited') throw mintRateLimited(app, taken.retryAfterSeconds);
    return mintDownload(app, options.downloadOrigin, taken.file, { shareId });
  }

  async function page(reply: FastifyReply, status: number, share: PublicShare | undefined, error?: string) {
    const left = share?.maxDownloads == null ? null : Math.max(0, share.maxDownloads - share.downloads);
    const html = await reply.viewAsync('share', {
      base: app.publicPath,
      error,
      share: share && {
        id: share.id,
        name: displayFileName(share.fileName),
        size: humanBytes(share.fileSize),
        expires: humanDate(share.expiresAt),
        iso: share.expiresAt.toISOString(),
        left,
        hasPassword: share.hasPassword,
        usable: usable(share),
      },
    });
    return reply.code(status).type('text/html; charset=utf-8').send(html);
  }

  // The page a recipient opens: what the file is, and a button. It reads, never counts.
  app.get<{ Params: IdParams }>(
    '/s/:id',
    { schema: { params: IdParams, hide: true } },
    async (request, reply) => {
      const share = await app.repos.shares.findLive(request.params.id);
      if (!share) return page(reply, 404, undefined);
      return page(reply, usable(share) ? 200 : 410, share);
    },
  );

  // The page's form: one download, then 303 to B with a fresh single-use token.
  app.post<{ Params: IdParams; Body: { password?: string } }>(
    '/s/:id/download',
    {
      schema: { params: IdParams, body: SharePassword, hide: true },
      preValidation: bodyOptional,
      config: { sharePage: true },
    },
    async (request, reply) => {
      const { url } = await download(request, request.params.id, request.body.password);
      return reply.redirect(url, 303);
    },
  );

  app.post<{ Params: IdParams; Body: { password?: string } }>(
    '/api/shares/:id/download-token',
    { schema: { params: IdParams, body: SharePassword }, preValidation: bodyOptional },
    async (request, reply) =>
      reply.code(201).send(await download(request, request.params.id, request.body.password)),
  );

  // A refused form post shows the share page again, with the reason and the status; the JSON
  // route and failures of A itself go to the app's error handler.
  app.setErrorHandler(async (error: FastifyError & { retryAfter?: number }, request, reply) => {
    const status = error.statusCode ?? 500;
    if (!request.routeOptions.config.sharePage || status >= 500 || error.code === 'CSRF_INVALID') throw error;
    // Only an id the route's schema would take reaches the database: a refusal that comes before
    // validation (the per-IP limit) carries the raw parameter.
    const id = (request.params as { id?: string }).id;
    const share = id && SHARE_ID.test(id) ? await app.repos.shares.findLive(id) : undefined;
    if (error.code === 'RATE_LIMITED') reply.header('retry-after', error.retryAfter ?? 60);
    const messages: Record<string, string> = {
      INVALID_CREDENTIALS: 'That password is not correct.',
      // Wrong passwords, or the owner's downloads per minute.
      RATE_LIMITED: `Too many attempts right now. Try again in ${error.retryAfter ?? 60} seconds.`,
      SHARE_EXPIRED: 'This link has expired or has no downloads left.',
    };
    // A link that does not exist (any more) says so on the page itself.
    const message =
      error.code === 'NOT_FOUND'
        ? undefined
        : (messages[error.code] ??
          (error.validation ? 'Please check the form and try again.' : error.message));
    return page(reply, error.validation ? 400 : status, share, message);
  });
}
