import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { nanoid } from 'nanoid';
import { InvalidCredentials, RateLimited, Unauthenticated, UsernameTaken } from '../errors.ts';
import { type PasswordCost, passwordHasher } from '../passwords.ts';
import { type User, withoutHash } from '../repositories/users.ts';

/** 3–64 letters, digits, `.`, `_`, `-` (design.md). */
export const Username = Type.String({ pattern: '^[A-Za-z0-9._-]{3,64}$' });
// Never truncated: argon2 takes the whole password, and 1024 characters bounds the work.
export const Password = Type.String({ minLength: 8, maxLength: 1024 });
export const CurrentPassword = Type.String({ minLength: 1, maxLength: 1024 });
const Credentials = Type.Object({ username: Username, password: Password }, { additionalProperties: false });
const PasswordChange = Type.Object(
  { currentPassword: CurrentPassword, newPassword: Password },
  { additionalProperties: false },
);

const userView = (user: User) => ({
  id: user.id,
  username: user.username,
  createdAt: user.createdAt.toISOString(),
});

export interface AuthOptions {
  passwordCost: PasswordCost;
  throttle: { maxPerAccount: number; maxPerIp: number; windowSeconds: number };
}

/**
 * What signing up, in and out and changing the password do, for the JSON API and the HTML forms
 * alike. Each throws the catalogue error the client should see.
 */
export function authActions(app: FastifyInstance, options: AuthOptions) {
  const passwords = passwordHasher(options.passwordCost);
  const { throttle } = options;

  // A new session id on every change of privilege: an id an attacker planted before sign-in
  // (session fixation) is worthless after it. The new session has a new CSRF token too.
  async function signIn(request: FastifyRequest, user: User) {
    await request.session.regenerate();
    request.session.userId = user.id;
    request.session.userAgent = request.headers['user-agent']?.slice(0, 512);
    request.session.ip = request.ip;
  }

  return {
    /** Creates the account and signs this session in; `USERNAME_TAKEN` in any letter case. */
    async register(request: FastifyRequest, username: string, password: string): Promise<User> {
      let user: User;
      try {
        user = await app.repos.users.create({
          id: nanoid(),
          username,
          passwordHash: await passwords.hash(password),
        });
      } catch (error) {
        if ((error as { code?: string }).code === '23505') throw new UsernameTaken({ cause: error });
        throw error;
      }
      await signIn(request, user);
      return user;
    },

    // Throttled per account and per client IP (shared by all replicas through Postgres): guessing
    // is slow, and no amount of failures locks the real user out beyond the window.
    /** Signs this session in under a new id; `RATE_LIMITED` (with `retryAfter`) or `INVALID_CREDENTIALS`. */
    async login(request: FastifyRequest, username: string, password: string): Promise<User> {
      const account = username.toLowerCase();
      // The attempt is recorded before it is counted and checked, so concurrent guesses cannot
      // all pass the count before any of them is recorded.
      const attempt = await app.repos.loginFailures.record(account, request.ip);
      const recent = await app.repos.loginFailures.recent(account, request.ip, throttle.windowSeconds);
      const freeAt = [
        recent.account > throttle.maxPerAccount ? recent.accountFreeAt : null,
        recent.client > throttle.maxPerIp ? recent.clientFreeAt : null,
      ].reduce<number>((latest, at) => Math.max(latest, at?.getTime() ?? 0), 0);
      if (freeAt > 0) {
        // A refused attempt does not count: it cannot extend the lockout.
        await app.repos.loginFailures.remove(attempt);
        app.stats.signIn('throttled');
        app.stats.throttled('sign_in');
        const seconds = Math.max(1, Math.ceil((freeAt - Date.now()) / 1000));
        throw Object.assign(new RateLimited(seconds), { retryAfter: seconds });
      }
      const found = await app.repos.users.findByUsername(username);
      // Unknown user and wrong password: the same answer, in the same time (passwords.verify).
      // The recorded attempt stays as the failure.
      if (!(await passwords.verify(found?.passwordHash, password)) || !found) {
        app.stats.signIn('invalid_credentials');
        throw new InvalidCredentials();
      }
      await app.repos.loginFailures.remove(attempt);
      await app.repos.loginFailures.clearAccount(account);
      const user = withoutHash(found);
      await signIn(request, user);
      app.stats.signIn('ok');
      return user;
    },

    /** Ends this session server-side. */
    async logout(request: FastifyRequest): Promise<void> {
      await request.session.destroy();
    },

    // Knowing the password is required again; afterwards this session gets a new id and every
    // other session of the user ends (a thief's included).
    /** For the signed-in `request.userId`; `INVALID_CREDENTIALS` if `currentPassword` is wrong. */
    async changePassword(
      request: FastifyRequest,
      currentPassword: string,
      newPassword: string,
    ): Promise<void> {
      const found = await app.repos.users.findById(request.userId);
      if (!found || !(await passwords.verify(found.passwordHash, currentPassword)))
        throw new InvalidCredentials();
      await app.repos.users.setPasswordHash(found.id, await passwords.hash(newPassword));
      await signIn(request, withoutHash(found));
      await app.repos.sessions.revokeOthers(found.id, request.sessionIdHash());
    },
  };
}

/** Register, sign in, sign out, who am I, change password. */
export default async function authRoutes(app: FastifyInstance, options: AuthOptions) {
  const auth = authActions(app, options);
  type CredentialsBody = { username: string; password: string };

  app.get('/api/csrf', async (_request, reply) => ({ token: reply.generateCsrf() }));

  app.post('/api/auth/register', { schema: { body: Credentials } }, async (request, reply) => {
    const { username, password } = request.body as CredentialsBody;
    const user = await auth.register(request, username, password);
    return reply.code(201).send({ user: userView(user) });
  });

  app.post('/api/auth/login', { schema: { body: Credentials } }, async (request) => {
    const { username, password } = request.body as CredentialsBody;
    return { user: userView(await auth.login(request, username, password)) };
  });

  app.post('/api/auth/logout', async (request, reply) => {
    await auth.logout(request);
    return reply.code(204).send();
  });

  app.get('/api/me', async (request) => {
    const userId = request.session.userId;
    const user = userId ? await app.repos.users.findById(userId) : undefined;
    if (!user) throw new Unauthenticated();
    return { user: userView(withoutHash(user)) };
  });

  app.post(
    '/api/auth/password',
    { schema: { body: PasswordChange }, onRequest: app.requireUser },
    async (request, reply) => {
      const { currentPassword, newPassword } = request.body as {
        currentPassword: string;
        newPassword: string;
      };
      await auth.changePassword(request, currentPassword, newPassword);
      return reply.code(204).send();
    },
  );
}
