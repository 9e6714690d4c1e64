import { errorPage, prefersHtml } from '@sfh/error-page';
import { logOutcome } from '@sfh/logging';
import type { FastifyError } from 'fastify';
import fp from 'fastify-plugin';
import { DownloadError, Internal, NotFound } from '../errors.ts';

const ID = /^[A-Za-z0-9_-]{1,64}$/;
type Refusal = FastifyError & { fileId?: string; shareId?: string; size?: number };

/**
 * Where a spent or expired token is renewed: the share page for a share token (its holder has no
 * account on A, and must never be sent to A's signed-in routes), else A's download link.
 */
function renewalUrl(appOrigin: string, error: Refusal): string | undefined {
  if (error.shareId !== undefined)
    return ID.test(error.shareId) ? `${appOrigin}/s/${error.shareId}` : undefined;
  return error.fileId && ID.test(error.fileId) ? `${appOrigin}/files/${error.fileId}/download` : undefined;
}

/**
 * Maps errors to `{ error, message }` (5xx details only in the log). A spent or expired token
 * carries the file id (a share token also the share id): browsers are sent back to A for a
 * fresh token (303), other clients get the same link as `renewUrl`.
 */
declare module 'fastify' {
  interface FastifyReply {
    /** The catalogue code this reply answered with, if it is an error (for metrics). */
    errorCode: string | undefined;
  }
}

export default fp(
  async (app, options: { appOrigin: string }) => {
    app.decorateReply('errorCode', undefined);
    app.setErrorHandler((error: Refusal, request, reply) => {
      const known = error instanceof DownloadError ? error : new Internal({ cause: error });
      const status = known.statusCode ?? 500;
      reply.errorCode = known.code;
      // In the request's one log line: the code, and for a fault of B's own, the cause.
      logOutcome(
        reply,
        known instanceof Internal
          ? { code: known.code, level: 'error', err: error }
          : { code: known.code, level: status >= 500 ? 'warn' : 'info' },
      );
      if (known.code === 'RANGE_NOT_SATISFIABLE') reply.header('content-range', `bytes */${error.size}`);
      if (status === 503) reply.header('retry-after', 5);
      const renewUrl = renewalUrl(options.appOrigin, error);
      if (prefersHtml(request.headers.accept)) {
        if (renewUrl) return reply.redirect(renewUrl, 303);
        // A browser (a link copied wrong, a file deleted since) gets a page, not JSON.
        return reply
          .code(status)
          .type('text/html; charset=utf-8')
          .send(
            errorPage({
              title: 'This download is not possible',
              message: known.message,
              link: { href: `${options.appOrigin}/`, text: 'Back to your files, for a fresh link' },
            }),
          );
      }
      return reply
        .code(status)
        .send({ error: known.code, message: known.message, ...(renewUrl ? { renewUrl } : {}) });
    });
    app.setNotFoundHandler((_request, reply) => {
      const error = new NotFound();
      logOutcome(reply, { code: error.code, level: 'info' });
      return reply.code(404).send({ error: error.code, message: error.message });
    });
  },
  { name: 'error-handler' },
);
