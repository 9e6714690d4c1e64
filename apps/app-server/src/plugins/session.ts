import fastifyCookie from '@fastify/cookie';
import fastifyCsrf from '@fastify/csrf-protection';
import fastifySession from '@fastify/session';
import type { FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { Unauthenticated } from '../errors.ts';
import { PgSessionStore } from '../session-store.ts';

declare module 'fastify' {
  interface Session {
    userId?: string;
  }
  interface FastifyInstance {
    /** onRequest hook: refuses requests without a signed-in user (401 UNAUTHENTICATED). */
    requireUser(request: FastifyRequest): Promise<void>;
  }
  interface FastifyRequest {
    /** The signed-in user's id; set by `requireUser`. */
    userId: string;
  }
}

export interface SessionOptions {
  /** Comma-separated secrets: the first signs, all verify. */
  secret: string;
  maxAgeSeconds: number;
  production: boolean;
}

const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/**
 * Server-side sessions: a random id in an HttpOnly cookie, the session in Postgres. Plus CSRF
 * protection for every state-changing request, bound to the session.
 */
export default fp(
  async (app, options: SessionOptions) => {
    const secrets = options.secret.split(',');
    await app.register(fastifyCookie);
    await app.register(fastifySession, {
      secret: secrets,
      // `__Host-` makes the browser insist on Secure, Path=/ and no Domain, so a sibling
      // subdomain cannot plant or overwrite the cookie.
      cookieName: options.production ? '__Host-sid' : 'sid',
      cookie: {
        httpOnly: true,
        sameSite: 'lax',
        secure: options.production ? true : 'auto',
        path: '/',
        maxAge: options.maxAgeSeconds * 1000,
      },
      // No row and no cookie for visitors who never needed a session.
      saveUninitialized: false,
      // Re-sending the cookie on every response would also rewrite the session on every request.
      rolling: false,
      store: new PgSessionStore(app.repos.sessions, options.maxAgeSeconds * 1000),
    });
    await app.register(fastifyCsrf, {
      sessionPlugin: '@fastify/session',
      getToken: (request) => request.headers['x-csrf-token'] as string | undefined,
    });

    // Every state-changing request, in every scope, must carry the session's CSRF token. The
    // check runs before the body is read, so a refused upload does not touch storage.
    app.addHook('onRequest', (request, reply, done) => {
      if (SAFE_METHODS.has(request.method)) return done();
      app.csrfProtection(request, reply, done);
    });

    app.decorateRequest('userId', '');
    app.decorate('requireUser', async (request: FastifyRequest) => {
      const userId = request.session.userId;
      if (!userId) throw new Unauthenticated();
      request.userId = userId;
    });
  },
  { name: 'session', dependencies: ['repositories'] },
);
