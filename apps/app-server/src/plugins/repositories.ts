import fp from 'fastify-plugin';
import { filesRepository } from '../repositories/files.ts';
import { loginFailuresRepository } from '../repositories/login-failures.ts';
import { objectDeletionsRepository } from '../repositories/object-deletions.ts';
import { registrationsRepository } from '../repositories/registrations.ts';
import { sessionsRepository } from '../repositories/sessions.ts';
import { sharesRepository } from '../repositories/shares.ts';
import { signingKeysRepository } from '../repositories/signing-keys.ts';
import { usersRepository } from '../repositories/users.ts';

export interface Repositories {
  users: ReturnType<typeof usersRepository>;
  sessions: ReturnType<typeof sessionsRepository>;
  files: ReturnType<typeof filesRepository>;
  loginFailures: ReturnType<typeof loginFailuresRepository>;
  objectDeletions: ReturnType<typeof objectDeletionsRepository>;
  registrations: ReturnType<typeof registrationsRepository>;
  shares: ReturnType<typeof sharesRepository>;
  signingKeys: ReturnType<typeof signingKeysRepository>;
}

declare module 'fastify' {
  interface FastifyInstance {
    repos: Repositories;
  }
}

export default fp(
  async (app) => {
    app.decorate('repos', {
      users: usersRepository(app.db),
      sessions: sessionsRepository(app.db),
      files: filesRepository(app.db),
      loginFailures: loginFailuresRepository(app.db),
      objectDeletions: objectDeletionsRepository(app.db),
      registrations: registrationsRepository(app.db),
      shares: sharesRepository(app.db),
      signingKeys: signingKeysRepository(app.db),
    });
  },
  { name: 'repositories', dependencies: ['db'] },
);
