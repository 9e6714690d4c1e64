import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import fastifyCookie from '@fastify/cookie';
import fastifyFormbody from '@fastify/formbody';
import fastifySession from '@fastify/session';
import type { FastifyReply, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { CsrfInvalid, Unauthenticated } from '../errors.ts';
import {
  hashSessionId,
  PgSessionStore,
  type SessionTimeouts,
  sessionLifetimeSeconds,
} from '../session-store.ts';

declare module 'fastify' {
  interface Session {
    userId?: string;
    /** Shown in the session list. */
    userAgent?: string;
    ip?: string;
    /** Set when a cookie signed with a retired secret is re-signed. */
    resignedAt?: number;
    /** The user's credential version at sign-in: the session is dead once it changes. */
    credentialVersion?: number;
  }
  interface FastifyReply {
    /**
     * A CSRF token for this request's forms and `x-csrf-token`: bound to the signed-in session,
     * or for a visitor who is not signed in to this browser's CSRF cookie (set if it has none).
     */
    generateCsrf(): string;
    /**
     * Remembers this browser as a device that signed in as `user` under its current credential
     * version (a long-lived signed cookie), keeping `deviceId` if it had one.
     */
    rememberDevice(user: DeviceOwner, deviceId: string | undefined): void;
  }
  interface FastifyInstance {
    /** onRequest hook: refuses requests without a signed-in user (401 UNAUTHENTICATED). */
    requireUser(request: FastifyRequest): Promise<void>;
  }
  interface FastifyRequest {
    /** The signed-in user's id; set by `requireUser`. */
    userId: string;
    /** Whether the browser presents A's session or CSRF cookie: it has been on A's pages. */
    hasAppCookie(): boolean;
    /** The database key of this request's session. */
    sessionIdHash(): string;
    /**
     * The id of this browser's device cookie if it signed in as `user` before, under the user's
     * current credential version.
     */
    knownDevice(user: DeviceOwner): string | undefined;
  }
}

/** Whose device a device cookie is: the account, and its credential version at sign-in. */
export interface DeviceOwner {
  id: string;
  credentialVersion: number;
}

export interface SessionOptions {
  /** Comma-separated secrets: the first signs, all verify. */
  secret: string;
  timeouts: SessionTimeouts;
  production: boolean;
  /** A's own origin: state-changing requests from any other are refused. */
  appOrigin: string;
}

const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);
const isForm = (request: FastifyRequest) =>
  request.headers['content-type']?.startsWith('application/x-www-form-urlencoded') ?? false;
const isMultipart = (request: FastifyRequest) =>
  request.headers['content-type']?.startsWith('multipart/form-data') ?? false;
const CLEANUP_MS = 10 * 60_000;
/** The CSRF cookie's value: 16 random bytes, base64url. */
const BROWSER_ID = /^[A-Za-z0-9_-]{22}$/;
/** Ours are 66 characters; anything much longer is not worth an HMAC. */
const MAX_CSRF_TOKEN_LENGTH = 256;
const DEVICE_COOKIE_MAX_AGE_SECONDS = 365 * 24 * 3600;

/**
 * Server-side sessions: a random id (192 bits) in an HttpOnly cookie, the session in Postgres.
 * Plus CSRF protection for every state-changing request, bound to the session (or, before
 * sign-in, to a cookie of the browser's own).
 */
export default fp(
  async (app, options: SessionOptions) => {
    const secrets = options.secret.split(',');
    const cookieName = options.production ? '__Host-sid' : 'sid';
    const deviceCookie = options.production ? '__Host-device' : 'device';
    // The secrets sign the device cookie too (the session plugin signs its own cookie).
    await app.register(fastifyCookie, { secret: secrets });
    await app.register(fastifyFormbody);
    await app.register(fastifySession, {
      secret: secrets,
      // `__Host-` makes the browser insist on Secure, Path=/ and no Domain, so a sibling
      // subdomain cannot plant or overwrite the cookie.
      cookieName,
      cookie: {
        httpOnly: true,
        sameSite: 'lax',
        secure: options.production ? true : 'auto',
        path: '/',
        maxAge: options.timeouts.absoluteSeconds * 1000,
      },
      // No row and no cookie for visitors who never needed a session.
      saveUninitialized: false,
      // Re-sending the cookie on every response would also rewrite the session on every request.
      rolling: false,
      store: new PgSessionStore(app.repos.sessions, options.timeouts),
    });

    // CSRF tokens, without a row: `<nonce>.<HMAC(key, binding, nonce)>`, the binding being the
    // signed-in session's id, or for a visitor who is not signed in a random value in an HttpOnly
    // cookie of its own (a signed double-submit token, OWASP's "signed double-submit cookie").
    // A page elsewhere can neither read that cookie nor compute a token without the key, so it
    // cannot post a form as the victim's browser, sign-in and sign-up included (login CSRF); a
    // token fetched by the attacker is bound to the attacker's cookie. `__Host-` in production
    // keeps a sibling subdomain from planting a cookie it holds a token for. Tokens of a session
    // die with it (a new id at sign-in and at every change of privilege). A cookieless GET of a
    // form writes nothing to the database: a row is created when there is something to keep.
    // One key per SESSION_SECRET, derived so that a token never doubles as a cookie signature;
    // the first signs, all verify (tokens in open pages survive a rotation).
    const csrfCookie = options.production ? '__Host-csrf' : 'csrf';
    const csrfKeys = secrets.map((secret) => createHmac('sha256', secret).update('sfh csrf token').digest());
    const csrfMac = (key: Buffer, binding: string, nonce: string) =>
      createHmac('sha256', key).update(`${binding}\n${nonce}`).digest();
    const csrfBinding = (request: FastifyRequest): string | undefined => {
      if (request.session.userId) return `session:${request.session.sessionId}`;
      const browser = request.cookies[csrfCookie];
      return browser && BROWSER_ID.test(browser) ? `browser:${browser}` : undefined;
    };
    const presentedToken = (request: FastifyRequest): unknown =>
      request.headers['x-csrf-token'] ??
      (request.body as { _csrf?: unknown } | undefined)?._csrf ??
      // A multipart form (the upload page without JavaScript) cannot set the header, and its
      // `_csrf` field is only readable after the file: it carries the token in the action's
      // query string instead, checked at onRequest before a byte is stored. Only there: a
      // token in a URL can end up in logs, so no other request may use this place.
      (isMultipart(request) ? (request.query as { _csrf?: unknown } | undefined)?._csrf : undefined);
    const validCsrf = (request: FastifyRequest): boolean => {
      const token = presentedToken(request);
      const binding = csrfBinding(request);
      if (typeof token !== 'string' || token.length > MAX_CSRF_TOKEN_LENGTH || !binding) return false;
      const [nonce, mac, ...rest] = token.split('.');
      if (!nonce || !mac || rest.length > 0) return false;
      const presented = Buffer.from(mac, 'base64url');
      return csrfKeys.some((key) => {
        const expected = csrfMac(key, binding, nonce);
        return presented.length === expected.length && timingSafeEqual(presented, expected);
      });
    };
    app.decorateReply('generateCsrf', function (this: FastifyReply) {
      let binding = csrfBinding(this.request);
      if (!binding) {
        const browser = randomBytes(16).toString('base64url');
        this.setCookie(csrfCookie, browser, {
          httpOnly: true,
          sameSite: 'lax',
          secure: options.production ? true : 'auto',
          path: '/',
          maxAge: options.timeouts.absoluteSeconds,
        });
        // A second token in the same response is bound to the same cookie.
        this.request.cookies[csrfCookie] = browser;
        binding = `browser:${browser}`;
      }
      const nonce = randomBytes(16).toString('base64url');
      return `${nonce}.${csrfMac(csrfKeys[0] as Buffer, binding, nonce).toString('base64url')}`;
    });

    // A cookie signed with a secret that is no longer first: re-sign it now. (@fastify/session
    // would otherwise answer with a cleared cookie, signing the user out after every rotation.)
    // The library has already checked the signature and signed the id with the first secret, so
    // a valid cookie that differs from that was signed with an older one: no second HMAC here.
    app.addHook('onRequest', async (request) => {
      const cookie = request.cookies[cookieName];
      if (cookie && request.session.userId && cookie !== request.session.encryptedSessionId) {
        request.session.resignedAt = Date.now();
      }
    });

    // An anonymous session's cookie lasts as long as its row (a signed-in session, regenerated
    // at sign-in, gets the configured maxAge again).
    app.addHook('onRequest', async (request) => {
      if (!request.session.userId)
        request.session.cookie.maxAge = sessionLifetimeSeconds(options.timeouts, false) * 1000;
    });

    // Every state-changing request, in every scope, must come from A's own pages (Origin) and
    // carry the session's CSRF token: in the header, checked before the body is read (a refused
    // upload never touches storage), or for HTML forms as the `_csrf` field once it is parsed.
    app.addHook('onRequest', (request, _reply, done) => {
      if (SAFE_METHODS.has(request.method)) return done();
      const origin = request.headers.origin;
      if (
        (origin !== undefined && origin !== options.appOrigin) ||
        request.headers['sec-fetch-site'] === 'cross-site'
      ) {
        return done(new CsrfInvalid());
      }
      if (isForm(request)) return done();
      done(validCsrf(request) ? undefined : new CsrfInvalid());
    });
    // preValidation: after parsing, before a body schema strips fields it does not list.
    app.addHook('preValidation', (request, _reply, done) => {
      if (SAFE_METHODS.has(request.method) || !isForm(request)) return done();
      done(validCsrf(request) ? undefined : new CsrfInvalid());
    });

    app.decorateRequest('userId', '');
    app.decorateRequest('hasAppCookie', function (this: FastifyRequest) {
      return this.cookies[cookieName] !== undefined || this.cookies[csrfCookie] !== undefined;
    });
    app.decorateRequest('sessionIdHash', function (this: FastifyRequest) {
      return hashSessionId(this.session.sessionId);
    });
    // Device cookies (OWASP's answer to lockout by an attacker): `<userId>.<credentialVersion>.
    // <deviceId>`, signed. A browser presenting one for the account is throttled on the count of
    // the account's devices, not on the account's. A cookie only counts under the version it was
    // issued under: a password change or "sign out everywhere" bumps the version and retires
    // every device cookie at once, so cookies an attacker collected while they knew the old
    // password buy no guesses at the new one.
    app.decorateRequest('knownDevice', function (this: FastifyRequest, user: DeviceOwner) {
      const raw = this.cookies[deviceCookie];
      if (!raw) return undefined;
      const { valid, value } = this.unsignCookie(raw);
      if (!valid || !value) return undefined;
      const [userId, version, deviceId, ...rest] = value.split('.');
      return userId === user.id && version === String(user.credentialVersion) && deviceId && rest.length === 0
        ? deviceId
        : undefined;
    });
    app.decorateReply('rememberDevice', function (this: FastifyReply, user: DeviceOwner, deviceId?: string) {
      const id = deviceId ?? randomBytes(16).toString('base64url');
      this.setCookie(deviceCookie, `${user.id}.${user.credentialVersion}.${id}`, {
        signed: true,
        httpOnly: true,
        sameSite: 'lax',
        secure: options.production ? true : 'auto',
        path: '/',
        maxAge: DEVICE_COOKIE_MAX_AGE_SECONDS,
      });
    });
    app.decorate('requireUser', async (request: FastifyRequest) => {
      const userId = request.session.userId;
      if (!userId) throw new Unauthenticated();
      request.userId = userId;
    });

    // Expired sessions and tombstones go eventually; any replica may do it.
    const cleanup = setInterval(() => {
      app.repos.sessions
        .deleteExpired()
        .catch((error) => app.log.warn({ err: error }, 'session cleanup failed'));
    }, CLEANUP_MS);
    cleanup.unref();
    app.addHook('onClose', async () => clearInterval(cleanup));
  },
  { name: 'session', dependencies: ['repositories'] },
);
