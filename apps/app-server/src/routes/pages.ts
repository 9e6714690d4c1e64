import { fileURLToPath } from 'node:url';
import fastifyStatic from '@fastify/static';
import fastifyView from '@fastify/view';
import { displayFileName } from '@sfh/download-token';
import { logOutcome } from '@sfh/logging';
import { Type } from '@sinclair/typebox';
import { Eta } from 'eta';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { NotFound, ValidationFailed } from '../errors.ts';
import { clientGone } from '../plugins/error-handler.ts';
import type { FileRecord } from '../repositories/files.ts';
import { type AuthOptions, authActions, CurrentPassword, Password, signOutOthers, Username } from './auth.ts';
import { deleteFile, type FilesOptions, IdParams, receiveUpload } from './files.ts';
import { device } from './sessions.ts';
import { NewShare, type SharesOptions, shareActions } from './shares.ts';

declare module 'fastify' {
  interface Session {
    /** One message for the next page this browser shows (post, redirect, get). */
    flash?: Flash;
  }
  interface FastifyRequest {
    /** The signed-in user's name, on the protected pages. */
    username: string;
  }
}

interface Flash {
  kind: 'success' | 'error';
  text: string;
  /** What the user typed into the sign-in or sign-up form, so a failed attempt keeps it. */
  username?: string;
}

export interface PagesOptions {
  auth: AuthOptions;
  files: FilesOptions;
  shares: SharesOptions;
  idleSeconds: number;
  /** Templates are compiled once and cached in production, re-read on every render otherwise. */
  production: boolean;
}

export const VIEWS_DIR = fileURLToPath(new URL('../views', import.meta.url));
const PUBLIC_DIR = fileURLToPath(new URL('../../public', import.meta.url));

const SESSION_ENDED = 'Your session has ended. Sign in again to continue.';

/**
 * Where to go after signing in: only a path on this origin. "//evil.example" and "/\evil.example"
 * are URLs of another host to a browser (an open redirect), and so is anything with a scheme.
 */
export function safeNext(value: unknown): string {
  if (typeof value !== 'string' || value.length > 2048 || !/^\/(?![/\\])[^\\\p{Cc}]*$/u.test(value))
    return '/';
  const base = 'http://a.invalid';
  return new URL(value, base).origin === base ? value : '/';
}

// The session the cookie named was not found (ended elsewhere, expired, revoked): the cookie's
// id differs from the fresh anonymous session's. Both cookie names: the plugin picks
// `__Host-sid` in production.
function sessionEnded(request: FastifyRequest): boolean {
  const presented = request.cookies.sid ?? request.cookies['__Host-sid'];
  if (!presented || !request.session) return false;
  return presented.slice(0, presented.lastIndexOf('.')) !== request.session.sessionId;
}

/**
 * Sends a signed-out browser to the sign-in page (303), saying so if its session has ended, and
 * back to `next` afterwards. Used by the protected pages and by the error handler (for
 * `GET /files/:id/download` and other navigations that need a user). "Your session has ended"
 * travels in the URL (`ended=1`), not in a new anonymous session: an ended session's cookie,
 * replayed, must not write a row per request.
 */
export function redirectToSignIn(request: FastifyRequest, reply: FastifyReply, next = request.url) {
  const ended = request.session && sessionEnded(request) ? '&ended=1' : '';
  return reply
    .header('cache-control', 'no-store')
    .redirect(`${request.server.publicPath}/login?next=${encodeURIComponent(safeNext(next))}${ended}`, 303);
}

/**
 * A browser whose Download link could not get a token (the file is gone, or too many downloads
 * this minute) goes back to its file list, which says why. Used by the error handler.
 */
export function backToFileList(request: FastifyRequest, reply: FastifyReply, error: FastifyError) {
  const { retryAfter } = error as FastifyError & { retryAfter?: number };
  request.session.flash = {
    kind: 'error',
    text:
      error.code === 'RATE_LIMITED'
        ? `You started too many downloads in the last minute. Try again in ${humanWait(retryAfter ?? 60)}.`
        : 'That file does not exist (any more).',
  };
  return reply.header('cache-control', 'no-store').redirect(`${request.server.publicPath}/`, 303);
}

/** "1.4 MB" (a no-break space before the unit): decimal units, as file managers show them. */
export function humanBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes}\u00a0B`;
  const units = ['kB', 'MB', 'GB', 'TB', 'PB'];
  let value = bytes;
  let unit = -1;
  do {
    value /= 1000;
    unit += 1;
  } while (value >= 999.95 && unit < units.length - 1);
  return `${value.toFixed(value < 100 ? 1 : 0)}\u00a0${units[unit]}`;
}

const dateFormat = new Intl.DateTimeFormat('en-GB', {
  dateStyle: 'medium',
  timeStyle: 'short',
  timeZone: 'UTC',
});
/** "3 Dec 2026, 16:20 UTC". */
export const humanDate = (date: Date) => `${dateFormat.format(date)} UTC`;

function humanWait(seconds: number): string {
  if (seconds < 90) return `${seconds} second${seconds === 1 ? '' : 's'}`;
  return `${Math.ceil(seconds / 60)} minutes`;
}

// File list order: `?sort=name|size|date`, a leading `-` for descending.
const SORTS = {
  name: (a: FileRecord, b: FileRecord) =>
    displayFileName(a.name).localeCompare(displayFileName(b.name), 'en', {
      sensitivity: 'base',
      numeric: true,
    }),
  size: (a: FileRecord, b: FileRecord) => a.size - b.size,
  date: (a: FileRecord, b: FileRecord) => a.createdAt.getTime() - b.createdAt.getTime(),
} as const;
type SortKey = keyof typeof SORTS;
// What a first click on a column header asks for: A to Z, largest and newest first.
const FIRST_DIRECTION: Record<SortKey, '' | '-'> = { name: '', size: '-', date: '-' };
const DEFAULT_SORT = '-date';

function parseSort(value: unknown): { key: SortKey; descending: boolean } {
  const raw = typeof value === 'string' && /^-?(name|size|date)$/.test(value) ? value : DEFAULT_SORT;
  return { key: raw.replace('-', '') as SortKey, descending: raw.startsWith('-') };
}

// Form bodies: the same field rules as the JSON API, plus the form's own fields.
const Credentials = Type.Object({
  username: Username,
  password: Password,
  next: Type.Optional(Type.String({ maxLength: 2048 })),
});
// The same username rule as the API: a name that cannot exist is refused before it reaches the
// throttle or the database.
const SignIn = Type.Object({
  username: Username,
  password: Type.String({ maxLength: 1024 }),
  next: Type.Optional(Type.String({ maxLength: 2048 })),
});
const PasswordChange = Type.Object({
  currentPassword: CurrentPassword,
  newPassword: Password,
  confirmPassword: Type.String({ maxLength: 1024 }),
});
const SessionParams = Type.Object({ id: Type.String({ format: 'uuid' }) });

/** Per form route: the page to return to, and what a refused form body means to the user. */
interface FormConfig {
  back: string;
  invalid?: string;
}
declare module 'fastify' {
  interface FastifyContextConfig {
    form?: FormConfig;
  }
}

/**
 * The server-rendered UI: the same actions as the JSON API, as HTML pages and form posts that
 * answer 303 with a flash message (post/redirect/get). Works without JavaScript; `app.js` adds
 * drag and drop and a progress bar per file on top. Every page is `no-store`, so "back" after
 * signing out shows nothing private.
 */
export default async function pageRoutes(app: FastifyInstance, options: PagesOptions) {
  const auth = authActions(app, options.auth);
  const shares = shareActions(app, options.shares);
  // HTML for browsers, not the JSON API: left out of /docs/json.
  app.addHook('onRoute', (route) => {
    route.schema = { ...route.schema, hide: true };
  });

  await app.register(fastifyStatic, { root: PUBLIC_DIR, prefix: '/assets/', index: false });
  await app.register(fastifyView, {
    // autoEscape is Eta's default: `<%= %>` escapes, `<%~ %>` (raw) only takes our own HTML.
    engine: { eta: new Eta({ autoEscape: true }) },
    root: VIEWS_DIR,
    production: options.production,
  });
  app.decorateRequest('username', '');

  const flash = (request: FastifyRequest, kind: Flash['kind'], text: string, extra: Partial<Flash> = {}) => {
    request.session.flash = { kind, text, ...extra };
  };

  async function render(
    request: FastifyRequest,
    reply: FastifyReply,
    view: string,
    data: { title: string; flash?: Flash } & Record<string, unknown>,
  ) {
    const kept = request.session?.flash;
    if (kept) delete request.session.flash;
    const message = kept ?? data.flash;
    const html = await reply.viewAsync(view, {
      ...data,
      flash: message,
      csrf: reply.generateCsrf(),
      username: request.username,
      path: request.url.split('?')[0],
      // Every link and form action of a page starts with it (A behind a path prefix).
      base: app.publicPath,
    });
    return reply.header('cache-control', 'no-store').type('text/html; charset=utf-8').send(html);
  }

  // `to` is a path as A routes it; the browser needs it under A's public path.
  const back = (reply: FastifyReply, to: string) =>
    reply.header('cache-control', 'no-store').redirect(`${app.publicPath}${to}`, 303);

  /** The message a person sees for each error the API can answer a form with. */
  function messageFor(error: FastifyError & { retryAfter?: number }, config: FormConfig): string {
    switch (error.code) {
      case 'FILE_TOO_LARGE':
        return `That file is larger than the upload limit of ${humanBytes(options.files.maxUploadBytes)}.`;
      case 'QUOTA_EXCEEDED':
        return `That upload would go over your storage quota of ${humanBytes(options.files.quotaBytes)}. Delete some files first.`;
      case 'RATE_LIMITED':
        return `${
          {
            '/register': 'Too many accounts were created from your network.',
            // The share form on the file list.
            '/': 'Too many share links were created in the last hour.',
            '/password': 'Too many wrong passwords.',
          }[config.back] ?? 'Too many failed sign-in attempts.'
        } Try again in ${humanWait(error.retryAfter ?? 60)}.`;
      case 'INVALID_CREDENTIALS':
        return config.back === '/password'
          ? 'Your current password is not correct.'
          : 'Wrong username or password.';
      case 'USERNAME_TAKEN':
        return 'That username is taken. Choose another one.';
      case 'UNAUTHENTICATED':
        return SESSION_ENDED;
      case 'CSRF_INVALID':
        return 'This form had expired, so nothing was changed. Please try again.';
      case 'NOT_FOUND':
        return (
          { '/sessions': 'That session has already ended.', '/shares': 'That share link does not exist.' }[
            config.back
          ] ?? 'That file does not exist (any more).'
        );
      case 'INSUFFICIENT_STORAGE':
        return 'The server is out of storage space; the file was not saved. Try again later.';
      case 'BUSY':
        return 'The server is busy right now. Please try again in a few seconds.';
      case 'VALIDATION_FAILED':
        return error.message;
      default:
        if (error.validation) return config.invalid ?? 'Please check the form and try again.';
        if ((error.statusCode ?? 500) >= 500)
          return 'Something went wrong on our side. Please try again shortly.';
        return error.message;
    }
  }

  // Errors of a form post, whatever raised them (the CSRF hooks, validation, the action): a
  // flash message and 303 back to the form. Failures of the session store itself, and page
  // loads, go to the app's error handler (a signed-out navigation becomes a sign-in redirect).
  app.setErrorHandler((error: FastifyError & { retryAfter?: number }, request, reply) => {
    const config = request.routeOptions.config.form;
    const status = error.statusCode ?? 500;
    // A cross-site post gets the plain 403: it has no business leaving a message in the session.
    // So does a refused post from a client that was never on A's pages (no session, no CSRF
    // cookie): a message kept for it would be a session row per forged post.
    const crossSite = request.headers['sec-fetch-site'] === 'cross-site';
    const stranger = error.code === 'CSRF_INVALID' && !request.hasAppCookie();
    if (
      !config ||
      !request.session ||
      crossSite ||
      stranger ||
      clientGone(request) ||
      (status >= 500 && error.code !== 'INSUFFICIENT_STORAGE' && error.code !== 'BUSY')
    )
      throw error;
    logOutcome(reply, { code: error.code, level: 'info', reason: error.message });
    // A form from a page whose session has ended fails its CSRF check: that is the news to tell.
    if (error.code === 'UNAUTHENTICATED' || sessionEnded(request))
      return redirectToSignIn(request, reply, config.back);
    const body = request.body as { username?: string; next?: string } | undefined;
    const keep = typeof body?.username === 'string' ? { username: body.username.slice(0, 64) } : {};
    flash(request, 'error', messageFor(error, config), keep);
    const next = body?.next ? `?next=${encodeURIComponent(safeNext(body.next))}` : '';
    return back(reply, config.back === '/login' ? `/login${next}` : config.back);
  });

  // Pages anyone may see. A signed-in visitor has nothing to do on them.
  app.get('/login', async (request, reply) => {
    const next = safeNext((request.query as { next?: unknown }).next);
    if (request.session.userId) return back(reply, next);
    const ended = (request.query as { ended?: unknown }).ended === '1';
    return render(request, reply, 'login', {
      title: 'Sign in',
      next,
      ...(ended && { flash: { kind: 'error', text: SESSION_ENDED } }),
    });
  });

  app.get('/register', async (request, reply) => {
    if (request.session.userId) return back(reply, '/');
    return render(request, reply, 'register', { title: 'Create an account' });
  });

  app.post(
    '/login',
    {
      schema: { body: SignIn },
      config: { form: { back: '/login', invalid: 'Enter your username and your password.' } },
    },
    async (request, reply) => {
      const { username, password, next } = request.body as {
        username: string;
        password: string;
        next?: string;
      };
      await auth.login(request, reply, username, password);
      return back(reply, safeNext(next));
    },
  );

  app.post(
    '/register',
    {
      schema: { body: Credentials },
      config: {
        form: {
          back: '/register',
          invalid:
            'Choose a username of 3 to 64 letters, digits, dots, dashes or underscores, and a password of at least 8 characters.',
        },
      },
    },
    async (request, reply) => {
      const { username, password } = request.body as { username: string; password: string };
      const user = await auth.register(request, reply, username, password);
      flash(request, 'success', `Welcome, ${user.username}. Your account is ready: upload your first file.`);
      return back(reply, '/');
    },
  );

  // Public, so that a browser whose session already ended can still press it. The old session
  // is ended server-side (regenerate revokes it); the fresh anonymous one carries the message.
  app.post('/logout', { config: { form: { back: '/' } } }, async (request, reply) => {
    if (request.session.userId) await request.session.regenerate();
    flash(request, 'success', 'You have signed out.');
    return back(reply, '/login');
  });

  // Pages and forms that need a signed-in user: one scope, one hook.
  await app.register(async (scope) => {
    scope.addHook('onRequest', async (request, reply) => {
      const userId = request.session.userId;
      const user = userId ? await app.repos.users.findById(userId) : undefined;
      if (!user) {
        // A form post goes back to its page after sign-in, never to the form's endpoint.
        const form = request.routeOptions.config.form;
        return redirectToSignIn(request, reply, request.method === 'GET' ? request.url : (form?.back ?? '/'));
      }
      request.userId = user.id;
      request.username = user.username;
    });

    scope.get('/', async (request, reply) => {
      const sort = parseSort((request.query as { sort?: unknown }).sort);
      const [records, used] = await Promise.all([
        app.repos.files.listForUser(request.userId),
        app.repos.files.usedBytes(request.userId),
      ]);
      const compare = SORTS[sort.key];
      records.sort((a, b) => (sort.descending ? -compare(a, b) : compare(a, b)));
      const files = records.map((file) => ({
        id: file.id,
        name: displayFileName(file.name),
        size: humanBytes(file.size),
        type: file.contentType,
        date: humanDate(file.createdAt),
        iso: file.createdAt.toISOString(),
      }));
      const columns = (['name', 'size', 'date'] as const).map((key) => {
        const active = sort.key === key;
        const descending = active ? !sort.descending : FIRST_DIRECTION[key] === '-';
        return {
          key,
          href: `${app.publicPath}/?sort=${descending ? '-' : ''}${key}`,
          ariaSort: active ? (sort.descending ? 'descending' : 'ascending') : undefined,
        };
      });
      const { quotaBytes, maxUploadBytes } = options.files;
      return render(request, reply, 'files', {
        title: 'Your files',
        files,
        columns,
        used: humanBytes(used),
        quota: quotaBytes > 0 ? humanBytes(quotaBytes) : undefined,
        maxUpload: humanBytes(maxUploadBytes),
        maxUploadBytes,
        remainingBytes: quotaBytes > 0 ? Math.max(0, quotaBytes - used) : undefined,
      });
    });

    // The multipart form of the page without JavaScript; its CSRF token is in the query string
    // (plugins/session.ts). With JavaScript, app.js sends each file to POST /api/files instead.
    scope.post('/upload', { config: { form: { back: '/' } } }, async (request, reply) => {
      const file = await receiveUpload(app, request, options.files);
      flash(request, 'success', `Uploaded “${displayFileName(file.name)}” (${humanBytes(file.size)}).`);
      return back(reply, '/');
    });

    scope.post<{ Params: IdParams }>(
      '/files/:id/delete',
      { schema: { params: IdParams }, config: { form: { back: '/' } } },
      async (request, reply) => {
        const file = await app.repos.files.findForUser(request.userId, request.params.id);
        if (!file) throw new NotFound();
        await deleteFile(app, request.userId, file.id);
        flash(request, 'success', `Deleted “${displayFileName(file.name)}”.`);
        return back(reply, '/');
      },
    );

    // Share links: made from a file's row, listed and revoked here.
    scope.get('/shares', async (request, reply) => {
      const now = Date.now();
      const list = (await shares.list(request.userId)).map((share) => ({
        ...share,
        name: displayFileName(share.fileName),
        state: share.revokedAt
          ? 'revoked'
          : Date.parse(share.expiresAt) <= now ||
              (share.maxDownloads !== null && share.downloads >= share.maxDownloads)
            ? 'expired'
            : 'active',
        expires: humanDate(new Date(share.expiresAt)),
        expiresIso: share.expiresAt,
        lastDownload: share.lastDownloadAt && humanDate(new Date(share.lastDownloadAt)),
        lastDownloadIso: share.lastDownloadAt,
      }));
      return render(request, reply, 'shares', {
        title: 'Share links',
        shares: list,
        failureWindow: humanWait(options.shares.passwordThrottle.windowSeconds),
      });
    });

    scope.post<{ Params: IdParams; Body: NewShare }>(
      '/files/:id/shares',
      {
        schema: { params: IdParams, body: NewShare },
        config: {
          form: {
            back: '/',
            invalid:
              'A share link needs an expiry of 1 minute to 30 days, at least 1 download (or none for unlimited), and a password of 8 to 1024 characters (or none).',
          },
        },
        // A field left empty in the form means "not set".
        preValidation: async (request) => {
          const body = (request.body ?? {}) as Record<string, unknown>;
          for (const key of Object.keys(body)) if (body[key] === '') delete body[key];
          request.body = body;
        },
      },
      async (request, reply) => {
        const share = await shares.create(request, request.params.id, request.body);
        flash(
          request,
          'success',
          `Share link for “${displayFileName(share.fileName)}” created: ${share.url}`,
        );
        return back(reply, '/shares');
      },
    );

    scope.post<{ Params: IdParams }>(
      '/shares/:id/revoke',
      { schema: { params: IdParams }, config: { form: { back: '/shares' } } },
      async (request, reply) => {
        await shares.revoke(request.userId, request.params.id);
        flash(request, 'success', 'The link is revoked: it downloads nothing any more.');
        return back(reply, '/shares');
      },
    );

    scope.get('/sessions', async (request, reply) => {
      const sessions = await app.repos.sessions.listForUser(
        request.userId,
        request.sessionIdHash(),
        options.idleSeconds,
      );
      return render(request, reply, 'sessions', {
        title: 'Your sessions',
        sessions: sessions.map((session) => ({
          id: session.id,
          current: session.current,
          device: device(session.userAgent),
          ip: session.ip ?? 'unknown',
          signedIn: humanDate(session.createdAt),
          lastSeen: humanDate(session.lastSeenAt),
          iso: session.lastSeenAt.toISOString(),
        })),
      });
    });

    scope.post<{ Params: { id: string } }>(
      '/sessions/:id/end',
      { schema: { params: SessionParams }, config: { form: { back: '/sessions' } } },
      async (request, reply) => {
        if (!(await app.repos.sessions.revokeForUser(request.userId, request.params.id)))
          throw new NotFound();
        flash(request, 'success', 'That session has ended: the device is signed out.');
        return back(reply, '/sessions');
      },
    );

    scope.post(
      '/sessions/end-others',
      { config: { form: { back: '/sessions' } } },
      async (request, reply) => {
        const ended = await signOutOthers(app, request, reply);
        flash(
          request,
          'success',
          ended === 0
            ? 'There were no other sessions.'
            : `Signed out ${ended} other session${ended === 1 ? '' : 's'}.`,
        );
        return back(reply, '/sessions');
      },
    );

    scope.get('/password', async (request, reply) =>
      render(request, reply, 'password', { title: 'Change password' }),
    );

    scope.post(
      '/password',
      {
        schema: { body: PasswordChange },
        config: {
          form: { back: '/password', invalid: 'The new password needs 8 to 1024 characters.' },
        },
      },
      async (request, reply) => {
        const { currentPassword, newPassword, confirmPassword } = request.body as {
          currentPassword: string;
          newPassword: string;
          confirmPassword: string;
        };
        if (newPassword !== confirmPassword) throw new ValidationFailed('The new passwords do not match.');
        await auth.changePassword(request, reply, currentPassword, newPassword);
        flash(
          request,
          'success',
          'Your password has changed. Every other session of yours has been signed out.',
        );
        return back(reply, '/');
      },
    );
  });
}
