import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { nanoid } from 'nanoid';
import { InvalidCredentials, Unauthenticated, UsernameTaken } from '../errors.ts';
import type { PasswordCost } from '../passwords.ts';
import { passwordHasher } from '../passwords.ts';
import type { User } from '../repositories/users.ts';

const Credentials = Type.Object(
  {
    username: Type.String({ pattern: '^[A-Za-z0-9._-]{3,64}$' }),
    // Never truncated: argon2 takes the whole password, and 1024 characters bounds the work.
    password: Type.String({ minLength: 8, maxLength: 1024 }),
  },
  { additionalProperties: false },
);

const userView = (user: User) => ({
  id: user.id,
  username: user.username,
  createdAt: user.createdAt.toISOString(),
});

/** Register, sign in, sign out, who am I. */
export default async function authRoutes(app: FastifyInstance, options: { passwordCost: PasswordCost }) {
  const passwords = passwordHasher(options.passwordCost);

  // A new session id on every change of privilege: an id an attacker planted before sign-in
  // (session fixation) is worthless after it.
  async function signIn(request: FastifyRequest, user: User) {
    await request.session.regenerate();
    request.session.userId = user.id;
  }

  app.get('/api/csrf', async (_request, reply) => ({ token: reply.generateCsrf() }));

  app.post('/api/auth/register', { schema: { body: Credentials } }, async (request, reply) => {
    const { username, password } = request.body as { username: string; password: string };
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
    return reply.code(201).send({ user: userView(user) });
  });

  app.post('/api/auth/login', { schema: { body: Credentials } }, async (request) => {
    const { username, password } = request.body as { username: string; password: string };
    const found = await app.repos.users.findByUsername(username);
    if (!(await passwords.verify(found?.passwordHash, password)) || !found) throw new InvalidCredentials();
    const user = { id: found.id, username: found.username, createdAt: found.createdAt };
    await signIn(request, user);
    return { user: userView(user) };
  });

  app.post('/api/auth/logout', async (request, reply) => {
    await request.session.destroy();
    return reply.code(204).send();
  });

  app.get('/api/me', async (request) => {
    const userId = request.session.userId;
    const user = userId ? await app.repos.users.findById(userId) : undefined;
    if (!user) throw new Unauthenticated();
    return { user: userView(user) };
  });
}
