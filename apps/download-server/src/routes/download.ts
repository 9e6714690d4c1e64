import type { DownloadClaims, VerifyOptions } from '@sfh/download-token';
import { DownloadTokenError, displayFileName, verifyDownloadToken } from '@sfh/download-token';
import type { ByteRange, ObjectRead } from '@sfh/storage';
import contentDisposition from 'content-disposition';
import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { keepUsedUntil } from '../acceptance.ts';
import {
  FileNotFound,
  RangeNotSatisfiable,
  ReplayStoreUnavailable,
  renewable,
  StorageUnavailable,
  TokenExpired,
  TokenInvalid,
  TokenMalformed,
  TokenUsed,
} from '../errors.ts';
import { parseRange } from '../range.ts';
import { decide, type Limits } from '../replay-store.ts';

export interface DownloadOptions {
  /** Everything but the allowlist, which follows the key set. */
  verify: Omit<VerifyOptions, 'algorithms' | 'currentDate'>;
  /** RESEND_MARGIN_BYTES: what an interrupted response gives back before its last written byte. */
  resendMarginBytes: number;
}

/** Most responses one token may send bytes in (design.md "Single use"). */
const MAX_RESPONSES = 32;

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
 * `GET|HEAD /d/:token[/:name]`: verify the token, reserve the bytes it will send, stream them.
 * Order matters: verify before anything else (a forged token never burns a real one and never
 * touches storage), then look at the file and the range (404 and 416 reserve nothing), then
 * reserve exactly that range atomically (one replay-store call: each byte is sent at most once
 * per token), then send. A response cut short gives back what it did not deliver.
 */
export default async function downloadRoutes(app: FastifyInstance, options: DownloadOptions) {
  const { storage } = app;

  async function download(request: FastifyRequest<{ Params: Params }>, reply: FastifyReply) {
    const claims = await verify(request.params.token, request.log);
    // The token carries the size: the range is known before the store is asked (a 416 never
    // reaches it), and the store gets one ranged read, no HEAD first.
    let range = selectRange(request, claims);
    let file = await read(claims.obj, range);
    if (range && file && staleIfRange(request, claims, file)) {
      // If-Range with a date other than the object's: the client's copy is stale, whole file.
      file.body.destroy();
      range = undefined;
      file = await read(claims.obj, range);
    }
    // A size that disagrees with the token means these are not the bytes A vouched for.
    if (file?.size !== claims.size) {
      file?.body.destroy();
      throw new FileNotFound();
    }
    try {
      return await send(request, reply, claims, file, range);
    } catch (error) {
      file.body.destroy();
      throw error;
    }
  }

  async function read(id: string, range: ByteRange | undefined): Promise<ObjectRead | undefined> {
    try {
      return await storage.read(id, range);
    } catch (error) {
      throw new StorageUnavailable({ cause: error });
    }
  }

  async function send(
    request: FastifyRequest<{ Params: Params }>,
    reply: FastifyReply,
    claims: DownloadClaims,
    file: ObjectRead,
    range: ByteRange | undefined,
  ) {
    const start = range ? range.start : 0;
    const end = range ? range.end + 1 : file.size;
    const limits: Limits = {
      maxBytes: file.size + Math.min(file.size, 8 * options.resendMarginBytes),
      maxResponses: MAX_RESPONSES,
    };
    if (request.method === 'HEAD') {
      // Answers as GET would, reserving nothing.
      const answer = decide(await replay(app.replayStore.usage(claims.jti)), start, end, limits);
      if (!answer.ok) throw renewable(new TokenUsed(), claims);
    } else {
      const keepUntil = keepUsedUntil(claims, options.verify);
      const answer = await replay(app.replayStore.reserve(claims.jti, start, end, keepUntil, limits));
      if (!answer.ok) {
        app.metrics.refused(answer.refusal);
        throw renewable(new TokenUsed(), claims);
      }
      releaseUnsent(request, reply, claims.jti, start, end);
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
    if (request.method === 'HEAD' || file.size === 0) {
      file.body.destroy();
      return reply.send();
    }
    // Streamed with backpressure; fastify destroys it when the client goes away.
    return reply.send(file.body);
  }

  /**
   * When the response ends before all of `[start, end)` was written (the client went away, or
   * the read failed), gives back from RESEND_MARGIN_BYTES before the last written byte to the
   * end: the socket's count includes what the kernel and the client's unread buffer still held,
   * which the client never saved. Off the hot path: a complete response costs one listener.
   */
  function releaseUnsent(
    request: FastifyRequest,
    reply: FastifyReply,
    jti: string,
    start: number,
    end: number,
  ) {
    const socket = request.raw.socket;
    const res = reply.raw;
    res.once('close', () => {
      const sentFile = res.statusCode === 200 || res.statusCode === 206;
      // Ended: the whole body went to the socket (all of it but its last buffer to the kernel).
      if (sentFile && res.writableEnded) return;
      const wrote = socket.bytesWritten - request.bytesWrittenBefore;
      // fastify runs onResponse only for responses that finished: count this one here.
      if (!res.writableEnded) app.metrics.download('aborted', Math.max(0, wrote || 0));
      // The count covers this response's head too (Node keeps it as `_header`), not only bytes.
      const head = (res as { _header?: string | null })._header?.length ?? 0;
      const total = wrote - head;
      const written = sentFile && total > 0 ? Math.min(end - start, total) : 0;
      const lastWritten = start + written;
      const from = Math.max(start, lastWritten - options.resendMarginBytes);
      if (from >= end) return;
      app.replayStore.release(jti, from, end, end - lastWritten).then(
        () => app.metrics.released(lastWritten - from),
        (error: unknown) =>
          request.log.warn({ err: error }, 'replay store: release failed; the unsent bytes stay reserved'),
      );
    });
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
  // during this response. A download cut short never reaches onResponse: releaseUnsent counts it.
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
function selectRange(request: FastifyRequest, claims: DownloadClaims) {
  const header = request.headers.range;
  if (!header) return undefined;
  // If-Range with anything but our validators: the client's partial copy is stale, so it gets
  // the whole file (200), never a range that would splice two different contents. The ETag is
  // checked here, a date once the store has said the object's (staleIfRange).
  const ifRange = request.headers['if-range'];
  if (ifRange !== undefined && /^(W\/)?"/.test(String(ifRange)) && ifRange !== `"${claims.sha256}"`)
    return undefined;
  const range = parseRange(header.trim(), claims.size);
  if (range === 'unsatisfiable') throw Object.assign(new RangeNotSatisfiable(), { size: claims.size });
  return range;
}

/** If-Range names neither our ETag nor the object's Last-Modified. */
function staleIfRange(request: FastifyRequest, claims: DownloadClaims, file: ObjectRead): boolean {
  const ifRange = request.headers['if-range'];
  return ifRange !== undefined && ifRange !== `"${claims.sha256}"` && ifRange !== file.mtime.toUTCString();
}
