import { Type } from '@sinclair/typebox';
import Bowser from 'bowser';
import type { FastifyInstance } from 'fastify';
import { NotFound } from '../errors.ts';
import { signOutOthers } from './auth.ts';

const IdParams = Type.Object({ id: Type.String({ format: 'uuid' }) });

/** "Chrome 131 on macOS", from the User-Agent recorded at sign-in. */
export function device(userAgent: string | null): string {
  if (!userAgent) return 'Unknown device';
  const { browser, os } = Bowser.parse(userAgent);
  const name = [browser.name, browser.version?.split('.')[0]].filter(Boolean).join(' ');
  return name && os.name ? `${name} on ${os.name}` : name || userAgent.slice(0, 80);
}

/**
 * The user's sessions: the server stays in control, so each can be listed and ended at once,
 * on every replica.
 */
export default async function sessionRoutes(app: FastifyInstance, options: { idleSeconds: number }) {
  app.addHook('onRequest', app.requireUser);

  app.get('/api/sessions', async (request) => {
    const sessions = await app.repos.sessions.listForUser(
      request.userId,
      request.sessionIdHash(),
      options.idleSeconds,
    );
    return {
      sessions: sessions.map((s) => ({
        id: s.id,
        current: s.current,
        device: device(s.userAgent),
        ip: s.ip,
        createdAt: s.createdAt.toISOString(),
        lastSeenAt: s.lastSeenAt.toISOString(),
      })),
    };
  });

  app.delete<{ Params: { id: string } }>(
    '/api/sessions/:id',
    { schema: { params: IdParams } },
    async (request, reply) => {
      if (!(await app.repos.sessions.revokeForUser(request.userId, request.params.id))) throw new NotFound();
      return reply.code(204).send();
    },
  );

  // Sign out everywhere else (device cookies included).
  app.delete('/api/sessions', async (request, reply) => {
    await signOutOthers(app, request, reply);
    return reply.code(204).send();
  });
}
