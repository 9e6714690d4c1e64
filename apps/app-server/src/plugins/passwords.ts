import fp from 'fastify-plugin';
import { type PasswordCost, type PasswordHasher, type PasswordWork, passwordHasher } from '../passwords.ts';

declare module 'fastify' {
  interface FastifyInstance {
    /** The process's one argon2id hasher: every password use shares its bounded queue. */
    passwords: PasswordHasher;
  }
}

export default fp<{ cost: PasswordCost; work: PasswordWork }>(
  async (app, options) => {
    app.decorate('passwords', passwordHasher(options.cost, options.work));
  },
  { name: 'passwords' },
);
