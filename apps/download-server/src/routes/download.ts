import type { DownloadClaims, VerifyOptions } from '@sfh/download-token';
import { DownloadTokenError, displayFileName, verifyDownloadToken } from '@sfh/download-token';
import { type ByteRange, discard, type ObjectRead } from '@sfh/storage';
import contentDisposition from 'content-disposition';
import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
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
 * `GET|HEAD /d/:token[/:name]`: verify the token, reserve the bytes it will send, open the
 * object, stream them. Order matters:
 * 1. verify before anything else (a forged token never burns a real one, never touches storage);
 * 2. the range, from the size the token carries (416 reserves nothing and reads nothing);
 * 3. reserve exactly that range atomically (one replay-store call: each byte is sent at most once
 *    per token), or for HEAD ask what a reserve would answer. A used or refused token is answered
 *    here, before storage is asked: replaying a spent link costs no storage request (on S3, a
 *    billable GetObject);
 * 4. open the object; when it is missing (404) or storage fails (503), the reservation is given
 *    back whole;
 * 5. send. A response cut short gives back what it did not deliver.
 */
export default async function downloadRoutes(app: FastifyInstance, options: DownloadOptions) {
  const { storage, singleUse } = app;

  async function download(request: FastifyRequest<{ Params: Params }>, reply: FastifyReply) {
    const claims = await verify(request.params.token, request.log);
    const head = request.method === 'HEAD';
    let range = selectRange(request, claims);
    let file = await take(request, claims, range, head);
    if (range && file && staleIfRange(request, claims, file)) {
      // If-Range with a date other than the object's: the client's copy is stale, whole file.
      discard(file);
      await giveBack(request, claims, range, head);
      range = undefined;
      file = await take(request, claims, range, head);
    }
    // A size that disagrees with the token means these are not the bytes A vouched for.
    if (file?.size !== claims.size) {
      if (file) discard(file);
      await giveBack(request, claims, range, head);
      throw new FileNotFound();
    }
    if (!head) releaseUnsent(request, reply, claims, range);
    try {
      return send(request, reply, claims, file, range);
    } catch (error) {
      discard(file);
      throw error;
    }
  }

  /** Reserves the range (HEAD: checks it), then opens the object; 410 before any storage request. */
  async function take(
    request: FastifyRequest,
    claims: DownloadClaims,
    range: ByteRange | undefined,
    head: boolean,
  ): Promise<ObjectRead | undefined> {
    const [start, end] = bounds(claims, range);
    const answer = await replay(
      head ? singleUse.check(claims, start, end) : singleUse.reserve(claims, start, end),
    );
    if (!answer.ok) {
      if (!head) app.metrics.refused(answer.refusal);
      throw renewable(new TokenUsed(), claims);
    }
    try {
      return await storage.read(claims.obj, range);
    } catch (error) {
      await giveBack(request, claims, range, head);
      throw new StorageUnavailable({ cause: error });
    }
  }

  /** A reservation that sent nothing is given back whole; failing that, it stays (the safe side). */
  async function giveBack(
    request: FastifyRequest,
    claims: DownloadClaims,
    range: ByteRange | undefined,
    head: boolean,
  ) {
    if (head) return;
    const [start, end] = bounds(claims, range);
    await singleUse.cancel(claims, start, end).catch((error: unknown) => {
      request.log.warn({ err: error }, 'replay store: could not give a reservation back; it stays reserved');
    });
  }

  function send(
    request: FastifyRequest<{ Params: Params }>,
    reply: FastifyReply,
    claims: DownloadClaims,
    file: ObjectRead,
    range: ByteRange | undefined,
  ) {
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
      discard(file);
      return reply.send();
    }
    // A small file's bytes at once; a stream with backpressure, which fastify destroys when the
    // client goes away.
    return reply.send(file.body);
  }

  /**
   * When the response ends before all of its range was written (the client went away, or the
   * read failed), gives back what the client may not have (single-use/policy.ts `giveBack`).
   * What was written is the socket's count during this response, head included, which Node keeps
   * public (`bytesWritten`); no private field of Node is read. Off the hot path: a complete
   * response costs one listener.
   */
  function releaseUnsent(
    request: FastifyRequest,
    reply: FastifyReply,
    claims: DownloadClaims,
    range: ByteRange | undefined,
  ) {
    const socket = request.raw.socket;
    const res = reply.raw;
    res.once('close', () => {
      const sentFile = res.statusCode === 200 || res.statusCode === 206;
      // Ended: the whole body went to the socket (all of it but its last buffer to the kernel).
      if (sentFile && res.writableEnded) return;
      const wrote = Math.max(0, socket.bytesWritten - request.bytesWrittenBefore || 0);
      // fastify runs onResponse only for responses that finished: count this one here.
      if (!res.writableEnded) app.metrics.download('aborted', wrote);
      const [start, end] = bounds(claims, range);
      singleUse.interrupted(claims, start, end, sentFile ? wrote : 0).then(
        (resendable) => {
          if (resendable > 0) app.metrics.released(resendable);
        },
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

/** The half-open byte range `[start, end)` a response of `range` sends. */
function bounds(claims: DownloadClaims, range: ByteRange | undefined): [number, number] {
  return range ? [range.start, range.end + 1] : [0, claims.size];
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
