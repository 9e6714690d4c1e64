import type { DownloadClaims, VerifyOptions } from '@sfh/download-token';
import { DownloadTokenError, displayFileName, verifyDownloadToken } from '@sfh/download-token';
import type { OpenObject } from '@sfh/storage';
import contentDisposition from 'content-disposition';
import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { keepUsedUntil } from '../acceptance.ts';
import {
  FileNotFound,
  RangeNotSatisfiable,
  ReplayStoreUnavailable,
  renewable,
  TokenExpired,
  TokenInvalid,
  TokenMalformed,
  TokenUsed,
} from '../errors.ts';
import { parseRange } from '../range.ts';

export interface DownloadOptions {
  /** Everything but the allowlist, which follows the key set. */
  verify: Omit<VerifyOptions, 'algorithms' | 'currentDate'>;
}

type Params = { token: string; name?: string };

declare module 'fastify' {
  interface FastifyRequest {
    bytesWrittenBefore: number;
  }
}

// Types a browser would render or run if it ever ignored `attachment` (or for a same-origin
// fetch): served as opaque bytes instead.
const ACTIVE_CONTENT = /html|xml|javascript|ecmascript|^text\/xsl|^application\/(x-)?(shockwave|java)/i;

/**
 * `GET|HEAD /d/:token[/:name]`: verify the token, claim it once, stream the file.
 * Order matters: verify before anything else (a forged token never burns a real one and never
 * touches storage), then look at the file and the range (404 and 416 do not consume the token),
 * then claim atomically, then send.
 */
export default async function downloadRoutes(app: FastifyInstance, options: DownloadOptions) {
  const { storage } = app;

  async function download(request: FastifyRequest<{ Params: Params }>, reply: FastifyReply) {
    const claims = await verify(request.params.token, request.log);
    const file = await storage.open(claims.obj);
    if (!file) throw new FileNotFound();
    try {
      return await send(request, reply, claims, file);
    } finally {
      file.release();
    }
  }

  async function send(
    request: FastifyRequest<{ Params: Params }>,
    reply: FastifyReply,
    claims: DownloadClaims,
    file: OpenObject,
  ) {
    // A size that disagrees with the token means these are not the bytes A vouched for.
    if (file.size !== claims.size) throw new FileNotFound();
    const range = selectRange(request, claims, file);

    if (request.method === 'HEAD') {
      if (await replay(app.replayStore.isClaimed(claims.jti))) throw renewable(new TokenUsed(), claims);
    } else {
      const keepUntil = keepUsedUntil(claims, options.verify);
      if (!(await replay(app.replayStore.claim(claims.jti, keepUntil))))
        throw renewable(new TokenUsed(), claims);
    }

    reply
      .header('content-type', ACTIVE_CONTENT.test(claims.ctype) ? 'application/octet-stream' : claims.ctype)
      .header(
        'content-disposition',
        contentDisposition(displayFileName(claims.name), {
          type: 'attachment',
          fallback: asciiName(claims.name),
        }),
      )
      .header('etag', `"${claims.sha256}"`)
      .header('last-modified', file.mtime.toUTCString())
      .header('accept-ranges', 'bytes');
    if (range) {
      reply
        .code(206)
        .header('content-range', `bytes ${range.start}-${range.end}/${file.size}`)
        .header('content-length', range.end - range.start + 1);
    } else {
      reply.header('content-length', file.size);
    }
    if (request.method === 'HEAD' || file.size === 0) return reply.send();
    return reply.send(file.createReadStream(range));
  }

  async function verify(token: string, log: FastifyBaseLogger): Promise<DownloadClaims> {
    try {
      return await verifyDownloadToken(token, app.keys.resolve, {
        ...options.verify,
        algorithms: app.keys.algorithms(),
      });
    } catch (error) {
      if (!(error instanceof DownloadTokenError)) throw error;
      // A genuine token (its signature checked out) that is not valid yet: A's clock is ahead of
      // B's by more than the tolerance. Operators need to hear that, not just "invalid token".
      if (error.claim === 'nbf' || error.claim === 'iat') {
        log.warn(
          { claim: error.claim, toleranceSeconds: options.verify.clockToleranceSeconds },
          'token from the future: clock skew between A and B exceeds CLOCK_TOLERANCE_SECONDS',
        );
      }
      if (error.code === 'TOKEN_MALFORMED') throw new TokenMalformed(error.message, { cause: error });
      // Expiry is checked after the signature, issuer and audience: these claims are genuine.
      if (error.code === 'TOKEN_EXPIRED') throw renewable(new TokenExpired({ cause: error }), error.claims);
      throw new TokenInvalid({ cause: error });
    }
  }

  // Outcome and bytes of every download request, for /metrics. Bytes are what the socket wrote
  // during this response, so aborted downloads count what they really got.
  // Callback hooks: an async one costs a promise per request on B's hot path.
  app.addHook('onRequest', (request, _reply, done) => {
    request.bytesWrittenBefore = request.raw.socket.bytesWritten;
    done();
  });
  app.addHook('onResponse', (request, reply, done) => {
    const result =
      reply.errorCode ?? (request.method === 'HEAD' ? 'head' : reply.statusCode === 206 ? 'partial' : 'ok');
    app.metrics.download(result, request.raw.socket.bytesWritten - request.bytesWrittenBefore);
    done();
  });
  app.decorateRequest('bytesWrittenBefore', 0);

  const schema = {
    params: { type: 'object', properties: { token: { type: 'string' }, name: { type: 'string' } } },
  };
  for (const url of ['/d/:token', '/d/:token/:name']) {
    app.route<{ Params: Params }>({ method: ['GET', 'HEAD'], url, schema, handler: download });
  }
}

/**
 * The plain-ASCII `filename` for clients that ignore RFC 8187 `filename*` ("résumé.pdf" becomes
 * "resume.pdf"). The library's own fallback keeps Latin-1 letters, which are not ASCII.
 */
function asciiName(name: string): string {
  return displayFileName(name)
    .normalize('NFKD')
    .replace(/[\u0300-\u036f]/g, '')
    .replace(/[^\x20-\x7e]/g, '_');
}

// Fail closed: when the store cannot say whether a token was used, nothing is sent.
async function replay<T>(answer: Promise<T>): Promise<T> {
  try {
    return await answer;
  } catch (error) {
    throw new ReplayStoreUnavailable({ cause: error });
  }
}

/** The single range to send, `undefined` for the whole file, or 416 (RFC 9110 §14). */
function selectRange(request: FastifyRequest, claims: DownloadClaims, file: OpenObject) {
  const header = request.headers.range;
  if (!header) return undefined;
  const ifRange = request.headers['if-range'];
  // If-Range with anything but our current validator: the client's partial copy is stale, so it
  // gets the whole file (200), never a range that would splice two different contents.
  if (ifRange !== undefined && ifRange !== `"${claims.sha256}"` && ifRange !== file.mtime.toUTCString())
    return undefined;
  const range = parseRange(header.trim(), file.size);
  if (range === 'unsatisfiable') throw Object.assign(new RangeNotSatisfiable(), { size: file.size });
  return range;
}
