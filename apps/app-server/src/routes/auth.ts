import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { nanoid } from 'nanoid';
import { InvalidCredentials, RateLimited, Unauthenticated, UsernameTaken } from '../errors.ts';
import { type User, type UserWithHash, withoutHash } from '../repositories/users.ts';

/** 3–64 letters, digits, `.`, `_`, `-` (README, "App server (A)"). */
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
  throttle: { maxPerAccount: number; maxPerIp: number; windowSeconds: number };
  /** Registrations per client IP and hour, across replicas; 0: no limit. */
  registrationsPerIpPerHour: number;
}

const REGISTRATION_WINDOW_SECONDS = 3600;
const CLEANUP_MS = 10 * 60_000;

/** 429 `RATE_LIMITED` until `freeAt` (epoch ms), with `retryAfter` for the header. */
export const rateLimited = (freeAt: number) => {
  const seconds = Math.max(1, Math.ceil((freeAt - Date.now()) / 1000));
  return Object.assign(new RateLimited(seconds), { retryAfter: seconds });
};

/**
 * Sign out everywhere else: bumps the signed-in user's credential version and keeps this session
 * and this browser's device cookie under the new one, so every other session and every other
 * device cookie of the user is dead. Resolves with the number of other sessions ended.
 */
export async function signOutOthers(app: FastifyInstance, request: FastifyRequest, reply: FastifyReply) {
  const user = await app.repos.users.findById(request.userId);
  if (!user) throw new Unauthenticated();
  const device = request.knownDevice(user);
  const credentialVersion = await app.repos.users.bumpCredentialVersion(user.id);
  request.session.credentialVersion = credentialVersion;
  reply.rememberDevice({ id: user.id, credentialVersion }, device);
  return app.repos.sessions.revokeOthers(user.id, request.sessionIdHash());
}

/**
 * What signing up, in and out and changing the password do, for the JSON API and the HTML forms
 * alike. Each throws the catalogue error the client should see.
 */
export function authActions(app: FastifyInstance, options: AuthOptions) {
  // The process's bounded argon2 queue: a flood of password work gets 503 BUSY, not a stall.
  const passwords = app.passwords;
  const { throttle } = options;

  // A new session id on every change of privilege: an id an attacker planted before sign-in
  // (session fixation) is worthless after it. The new session has a new CSRF token too. It
  // lives only under the credential version it was signed in with (a password change ends it).
  async function signIn(
    request: FastifyRequest,
    reply: FastifyReply,
    user: User,
    credentialVersion: number,
    device: string | undefined,
  ) {
    await request.session.regenerate();
    request.session.userId = user.id;
    request.session.credentialVersion = credentialVersion;
    request.session.userAgent = request.headers['user-agent']?.slice(0, 512);
    request.session.ip = request.ip;
    reply.rememberDevice({ id: user.id, credentialVersion }, device);
  }

  // Every password check (sign-in, password change) is throttled per client IP, and per account
  // unless this browser has signed in to the account before under its current credential
  // version: then on the count of the account's known devices together instead. So guessing is
  // slow (at most twice the account's limit per window, whatever number of device cookies an
  // attacker holds), and an attacker who keeps the account's count full cannot lock the owner
  // out of a device they used before (shared by all replicas through Postgres). A refused
  // attempt does not count, so it cannot extend a lockout.
  /** Resolves with the known device of the check; `RATE_LIMITED` or `INVALID_CREDENTIALS`. */
  async function checkPassword(
    request: FastifyRequest,
    username: string,
    found: UserWithHash | undefined,
    password: string,
  ): Promise<string | undefined> {
    const device = found ? request.knownDevice(found) : undefined;
    const repo = app.repos.loginFailures;
    // The attempt is recorded before it is counted and checked, so concurrent guesses cannot
    // all pass the count before any of them is recorded.
    const attempt = await repo.record(username, request.ip, device ?? null);
    const recent = await repo.recent(username, request.ip, throttle.windowSeconds);
    const freeAt = [
      device === undefined && recent.account > throttle.maxPerAccount ? recent.accountFreeAt : null,
      device !== undefined && recent.devices > throttle.maxPerAccount ? recent.devicesFreeAt : null,
      recent.client > throttle.maxPerIp ? recent.clientFreeAt : null,
    ].reduce<number>((latest, at) => Math.max(latest, at?.getTime() ?? 0), 0);
    if (freeAt > 0) {
      await repo.remove(attempt);
      throw rateLimited(freeAt);
    }
    // Unknown user and wrong password: the same answer, in the same time (passwords.verify).
    // The recorded attempt stays as the failure.
    if (!(await passwords.verify(found?.passwordHash, password)) || !found) throw new InvalidCredentials();
    await repo.remove(attempt);
    await repo.clear(username, device !== undefined);
    return device;
  }

  return {
    /**
     * Creates the account and signs this session in; `USERNAME_TAKEN` in any letter case,
     * checked before the password is hashed; `RATE_LIMITED` over the registrations per IP.
     */
    async register(
      request: FastifyRequest,
      reply: FastifyReply,
      username: string,
      password: string,
    ): Promise<User> {
      if (await app.repos.users.findByUsername(username)) throw new UsernameTaken();
      const limit = options.registrationsPerIpPerHour;
      if (limit > 0) {
        const recent = await app.repos.registrations.record(request.ip, REGISTRATION_WINDOW_SECONDS);
        if (recent.count > limit) {
          await app.repos.registrations.remove(recent.id);
          throw rateLimited(recent.freeAt.getTime());
        }
      }
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
      await signIn(request, reply, user, 0, undefined);
      return user;
    },

    /** Signs this session in under a new id; `RATE_LIMITED` (with `retryAfter`) or `INVALID_CREDENTIALS`. */
    async login(
      request: FastifyRequest,
      reply: FastifyReply,
      username: string,
      password: string,
    ): Promise<User> {
      const found = await app.repos.users.findByUsername(username);
      let device: string | undefined;
      try {
        device = await checkPassword(request, username, found, password);
      } catch (error) {
        if (error instanceof RateLimited) {
          app.stats.signIn('throttled');
          app.stats.throttled('sign_in');
        } else if (error instanceof InvalidCredentials) app.stats.signIn('invalid_credentials');
        throw error;
      }
      const account = found as UserWithHash;
      await signIn(request, reply, withoutHash(account), account.credentialVersion, device);
      app.stats.signIn('ok');
      return withoutHash(account);
    },

    /** Ends this session server-side. */
    async logout(request: FastifyRequest): Promise<void> {
      await request.session.destroy();
    },

    // Knowing the password is required again (throttled like sign-in: a stolen session must not
    // guess it without limit); afterwards this session gets a new id and every other session of
    // the user ends (a thief's included, and one signing in with the old password right now).
    /** For the signed-in `request.userId`; `INVALID_CREDENTIALS` if `currentPassword` is wrong. */
    async changePassword(
      request: FastifyRequest,
      reply: FastifyReply,
      currentPassword: string,
      newPassword: string,
    ): Promise<void> {
      const found = await app.repos.users.findById(request.userId);
      if (!found) throw new InvalidCredentials();
      const device = await checkPassword(request, found.username, found, currentPassword);
      const version = await app.repos.users.setPasswordHash(found.id, await passwords.hash(newPassword));
      await signIn(request, reply, withoutHash(found), version, device);
      await app.repos.sessions.revokeOthers(found.id, request.sessionIdHash());
    },
  };
}

/** Register, sign in, sign out, who am I, change password. */
export default async function authRoutes(app: FastifyInstance, options: AuthOptions) {
  const auth = authActions(app, options);

  // Throttling rows past their window count for nothing: any replica may drop them.
  const cleanup = setInterval(() => {
    Promise.all([
      app.repos.loginFailures.deleteOlderThan(options.throttle.windowSeconds),
      app.repos.registrations.deleteOlderThan(REGISTRATION_WINDOW_SECONDS),
    ]).catch((error) => app.log.warn({ err: error }, 'throttle cleanup failed'));
  }, CLEANUP_MS);
  cleanup.unref();
  app.addHook('onClose', async () => clearInterval(cleanup));
  type CredentialsBody = { username: string; password: string };

  app.get('/api/csrf', async (_request, reply) => ({ token: reply.generateCsrf() }));

  app.post('/api/auth/register', { schema: { body: Credentials } }, async (request, reply) => {
    const { username, password } = request.body as CredentialsBody;
    const user = await auth.register(request, reply, username, password);
    return reply.code(201).send({ user: userView(user) });
  });

  app.post('/api/auth/login', { schema: { body: Credentials } }, async (request, reply) => {
    const { username, password } = request.body as CredentialsBody;
    return { user: userView(await auth.login(request, reply, username, password)) };
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
      await auth.changePassword(request, reply, currentPassword, newPassword);
      return reply.code(204).send();
    },
  );
}
