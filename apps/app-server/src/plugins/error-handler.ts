import { errorPage, prefersHtml } from '@sfh/error-page';
import { logOutcome } from '@sfh/logging';
import { StorageUnavailableError } from '@sfh/storage';
import type { FastifyError, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import {
  AppError,
  DatabaseUnavailable,
  InsufficientStorage,
  Internal,
  isDatabaseDown,
  NotFound,
  StorageUnavailable,
  ValidationFailed,
} from '../errors.ts';
import { backToFileList, redirectToSignIn, safeNext } from '../routes/pages.ts';

/** The code of the log line of a request whose client went away mid-body (nginx logs these as 499). */
const CLIENT_GONE = 'CLIENT_GONE';

/** The client went away (or was cut off by a timeout) before its request body was all sent. */
export const clientGone = (request: FastifyRequest) => !request.raw.complete && request.raw.destroyed;

/** Maps any error to the catalogue; clients see `{ error, message }`, logs see the cause. */
function toCatalogueError(error: FastifyError): FastifyError {
  if (error instanceof AppError) return error;
  if (error.validation) return new ValidationFailed(error.message, { cause: error });
  if (error instanceof StorageUnavailableError) return new StorageUnavailable({ cause: error });
  if (error.code === 'ENOSPC' || error.code === 'EDQUOT') return new InsufficientStorage({ cause: error });
  if (isDatabaseDown(error)) return new DatabaseUnavailable({ cause: error });
  // Fastify's and its plugins' own client errors (bad JSON, wrong content type, body too large):
  // 413 and 415 keep their status, the rest are plain 400s.
  const status = error.statusCode ?? 500;
  if (status >= 400 && status < 500) {
    const keep = status === 413 || status === 415;
    return Object.assign(new ValidationFailed(error.message, { cause: error }), {
      statusCode: keep ? status : 400,
    });
  }
  return new Internal({ cause: error });
}

export default fp(
  async (app) => {
    app.setErrorHandler(
      (error: FastifyError & { retryAfter?: number; sessionNotSaved?: boolean }, request, reply) => {
        // The session store failed to save in onSend: answering would try the same save again
        // and fail past this handler (fastify's default answer, with the raw database error).
        if (error.sessionNotSaved) (request as { session: unknown }).session = null;
        // A client that went away before its body was all sent (an aborted upload, a closed tab)
        // makes the body's stream fail: nobody is left to answer, and it is nothing the server
        // did. One line at info, no stack: anyone can do it as often as they like, and it must
        // neither flood the error log nor wake anyone. (No completion line follows: the
        // response never finishes.)
        if (clientGone(request)) {
          request.log.info(
            { req: request, responseTime: reply.elapsedTime, code: CLIENT_GONE, reason: error.message },
            'client went away',
          );
          return reply.code(400).send();
        }
        const mapped = toCatalogueError(error);
        const status = mapped.statusCode ?? 500;
        // The request's one log line (written when it completes) carries the code; 5xx also the cause.
        logOutcome(
          reply,
          status >= 500
            ? { code: mapped.code, level: 'error', err: error }
            : { code: mapped.code, level: 'info', reason: error.message },
        );
        // A signed-out navigation (the download link, a bookmarked page) goes to the sign-in page
        // and comes back afterwards; API clients keep getting the 401.
        const navigation = request.method === 'GET' && prefersHtml(request.headers.accept);
        if (navigation && mapped.code === 'UNAUTHENTICATED') return redirectToSignIn(request, reply);
        // The Download link of a signed-in browser, refused: back to the list, which says why.
        if (
          navigation &&
          request.routeOptions.config.fileListOnError &&
          (mapped.code === 'NOT_FOUND' || mapped.code === 'RATE_LIMITED')
        )
          return backToFileList(request, reply, mapped);
        if (status === 503) reply.header('retry-after', 5);
        if (mapped.code === 'DATABASE_UNAVAILABLE') {
          app.stats.databaseUnavailable();
        }
        if (mapped.code === 'RATE_LIMITED') reply.header('retry-after', error.retryAfter ?? 60);
        // A page that cannot be shown because A itself is failing (the database is down): words, not JSON.
        if (navigation && status >= 500) {
          return reply
            .code(status)
            .type('text/html; charset=utf-8')
            .send(
              errorPage({
                title: 'Something went wrong',
                message: mapped.message,
                // A's own path only: `GET //evil.example/...` must not become a link to that host.
                link: { href: `${app.publicPath}${safeNext(request.url)}`, text: 'Try again' },
              }),
            );
        }
        return reply.code(status).send({ error: mapped.code, message: mapped.message });
      },
    );
    app.setNotFoundHandler((request, reply) => {
      const error = new NotFound();
      logOutcome(reply, { code: error.code, level: 'info' });
      return reply
        .code(404)
        .send({ error: error.code, message: `${error.message}: ${request.method} ${request.url}` });
    });
  },
  { name: 'error-handler' },
);
