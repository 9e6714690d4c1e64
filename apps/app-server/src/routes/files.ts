import { MAX_FILE_NAME_LENGTH } from '@sfh/download-token';
import { newObjectId, type StoredObject } from '@sfh/storage';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { nanoid } from 'nanoid';
import { FileTooLarge, NotFound, QuotaExceeded, RateLimited, ValidationFailed } from '../errors.ts';
import type { FileRecord } from '../repositories/files.ts';
import { isStorableText } from '../text.ts';

export interface FilesOptions {
  maxUploadBytes: number;
  /** Bytes a user may store in all; 0: no quota. */
  quotaBytes: number;
  downloadOrigin: string;
  /** Download tokens a user may mint per minute, across all replicas; 0: no limit. */
  mintRatePerMinute: number;
  /** The longest an upload may take: its quota reservation lapses then. */
  uploadTimeoutSeconds: number;
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** A browser refused here (404, 429) goes back to its file list, with the reason. */
    fileListOnError?: boolean;
  }
}

export const IdParams = Type.Object({ id: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' }) });
export type IdParams = { id: string };

/**
 * How long after UPLOAD_TIMEOUT_SECONDS an upload's object may still be waiting for its row: the
 * store finishing the object (a multipart upload's completion, with its retries) and the insert.
 */
const UPLOAD_SWEEP_MARGIN_SECONDS = 600;

const MIME_TYPE = /^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}\/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$/;

// busboy's parse errors (no boundary, a body cut short) carry no status, and a second file
// part is a limit error: the client sent a broken or unwanted body, a 400, not a server error.
const MULTIPART_PARSE_ERROR = /^(Multipart: |Unexpected end of|Malformed part header)/;
const PART_LIMITS = new Set(['FST_FILES_LIMIT', 'FST_PARTS_LIMIT', 'FST_FIELDS_LIMIT']);
function rethrowMalformed(error: unknown): never {
  const code = (error as { code?: string }).code;
  if (code && PART_LIMITS.has(code)) {
    throw new ValidationFailed('Send exactly one file per request', { cause: error });
  }
  if (error instanceof Error && code === undefined && MULTIPART_PARSE_ERROR.test(error.message)) {
    throw new ValidationFailed(`Malformed multipart body: ${error.message}`, { cause: error });
  }
  throw error;
}

const fileView = (file: FileRecord) => ({
  id: file.id,
  name: file.name,
  size: file.size,
  contentType: file.contentType,
  sha256: file.sha256,
  createdAt: file.createdAt.toISOString(),
});

/**
 * Receives one uploaded file (multipart field `file`) for the signed-in `request.userId`, within
 * the upload limit and the user's quota, and records it. Nothing is kept when it fails:
 * `FILE_TOO_LARGE`, `QUOTA_EXCEEDED`, `VALIDATION_FAILED` (malformed body, no or several files).
 */
export async function receiveUpload(
  app: FastifyInstance,
  request: FastifyRequest,
  options: Pick<FilesOptions, 'maxUploadBytes' | 'quotaBytes' | 'uploadTimeoutSeconds'>,
): Promise<FileRecord> {
  const quota = options.quotaBytes;
  // The quota is reserved before a byte is stored (as much as the body can hold, at most what
  // is left), so uploads running side by side never put more than the quota on disk together.
  let reservation: { id: string; bytes: number } | undefined;
  if (quota > 0) {
    const bodyBytes = Number(request.headers['content-length']) || options.maxUploadBytes;
    const wanted = Math.min(options.maxUploadBytes, bodyBytes);
    reservation = await app.repos.files.reserve(request.userId, wanted, quota, options.uploadTimeoutSeconds);
    if (!reservation) throw new QuotaExceeded(quota);
  }
  try {
    return await storeUpload(app, request, options, reservation);
  } finally {
    if (reservation) await app.repos.files.release(reservation.id);
  }
}

async function storeUpload(
  app: FastifyInstance,
  request: FastifyRequest,
  options: Pick<FilesOptions, 'maxUploadBytes' | 'quotaBytes' | 'uploadTimeoutSeconds'>,
  reservation: { id: string; bytes: number } | undefined,
): Promise<FileRecord> {
  const quota = options.quotaBytes;
  const limit = Math.min(options.maxUploadBytes, reservation?.bytes ?? Number.POSITIVE_INFINITY);
  const overLimit = () =>
    limit < options.maxUploadBytes ? new QuotaExceeded(quota) : new FileTooLarge(options.maxUploadBytes);

  let objectId: string | undefined;
  let stored: StoredObject | undefined;
  let name = '';
  let contentType = '';
  try {
    // Fields (a form's `_csrf`) are skipped; exactly one file part, named "file".
    // preservePath: the name is kept whole ("reports/q1.pdf"); it is metadata, never a path.
    for await (const part of request.parts({
      preservePath: true,
      limits: { fileSize: limit, files: 1, fields: 4, parts: 5 },
    })) {
      if (part.type !== 'file') continue;
      if (part.fieldname !== 'file') {
        part.file.resume();
        throw new ValidationFailed('Send the file as a multipart field named "file"');
      }
      // Names are metadata only, kept as given (never part of a path); control and bidi
      // characters are removed where a name is shown (displayFileName). What Postgres cannot
      // store (NUL, lone surrogates) is refused.
      name = part.filename;
      if (name.length === 0 || name.length > MAX_FILE_NAME_LENGTH) {
        part.file.resume();
        throw new ValidationFailed(`File names must have 1 to ${MAX_FILE_NAME_LENGTH} characters`);
      }
      if (!isStorableText(name)) {
        part.file.resume();
        throw new ValidationFailed('File names must not contain NUL or invalid Unicode');
      }
      const mimeType = part.mimetype.toLowerCase();
      contentType = MIME_TYPE.test(mimeType) ? mimeType : 'application/octet-stream';
      // busboy ends a file that hits the limit as if it were complete. Failing the stream makes
      // the store discard what it wrote so far; the `truncated` check catches a limit reached
      // before this listener existed (a small body parsed in one go).
      part.file.once('limit', () => part.file.destroy(overLimit()));
      // Queued for deletion before a byte is stored, due once this upload cannot be running any
      // more; its row takes the entry off. If A dies in between (mid-upload, or between a complete
      // object and its row), the sweep deletes what it left: no object without a row, ever.
      const id = newObjectId();
      await app.repos.objectDeletions.queue(id, options.uploadTimeoutSeconds + UPLOAD_SWEEP_MARGIN_SECONDS);
      objectId = id;
      stored = await app.storage.put(part.file, id);
      if (part.file.truncated) throw overLimit();
    }
  } catch (error) {
    // Whatever was stored of it, or what a failing bucket may keep (parts it could not abort).
    if (objectId) await app.objectDeletions.discard(objectId);
    rethrowMalformed(error);
  }
  if (!stored) throw new ValidationFailed('Send the file as a multipart field named "file"');

  const file = await app.repos.files
    .createWithinQuota(
      {
        id: nanoid(),
        userId: request.userId,
        objectId: stored.id,
        name,
        contentType,
        size: stored.size,
        sha256: stored.sha256,
      },
      quota,
      reservation?.id ?? null,
    )
    .catch(async (error: unknown) => {
      // Bytes without a row would be unreachable garbage.
      await app.objectDeletions.discard((stored as StoredObject).id);
      throw error;
    });
  if (!file) {
    // Concurrent uploads together went over the quota: this one lost the race.
    await app.objectDeletions.discard(stored.id);
    throw new QuotaExceeded(quota);
  }
  app.stats.upload(file.size);
  return file;
}

/**
 * Deletes the user's file and its bytes; `NOT_FOUND` if there is no such file of theirs. The row
 * goes first, queueing its object (object_deletions); the bytes go at once, so a token minted
 * before gets 404 from B, or, if the store is down, as soon as the sweep reaches them.
 */
export async function deleteFile(app: FastifyInstance, userId: string, fileId: string): Promise<void> {
  const file = await app.repos.files.deleteForUser(userId, fileId);
  if (!file) throw new NotFound();
  await app.objectDeletions.discard(file.objectId);
}

/** 429 `RATE_LIMITED` for a user over `MINT_RATE_PER_MINUTE`, counted in the metrics. */
export function mintRateLimited(app: FastifyInstance, retryAfterSeconds: number) {
  const seconds = Math.max(1, retryAfterSeconds);
  app.stats.throttled('mint');
  return Object.assign(new RateLimited(seconds), { retryAfter: seconds });
}

/**
 * Mints a download token for `file` and B's URL for it: for its signed-in owner (`sub` the user
 * id), or through a share link (`sub` is `share:<id>`, and `shr` names the share).
 */
export async function mintDownload(
  app: FastifyInstance,
  downloadOrigin: string,
  file: FileRecord,
  by: { userId: string } | { shareId: string },
) {
  const { token, expiresAt } = await app.tokens.mint(
    {
      fid: file.id,
      obj: file.objectId,
      name: file.name,
      ctype: file.contentType,
      size: file.size,
      sha256: file.sha256,
      ...('shareId' in by && { shr: by.shareId }),
    },
    'shareId' in by ? `share:${by.shareId}` : by.userId,
  );
  app.stats.tokenMinted('shareId' in by ? 'share' : 'session');
  // The trailing name is cosmetic, for tools that name files after the URL.
  const url = `${downloadOrigin}/d/${token}/${encodeURIComponent(file.name)}`;
  return { url, token, expiresAt: expiresAt.toISOString() };
}

/** The signed-in user's files: upload, list, get, delete, and download tokens for them. */
export default async function fileRoutes(app: FastifyInstance, options: FilesOptions) {
  app.addHook('onRequest', app.requireUser);

  app.post('/api/files', async (request, reply) =>
    reply.code(201).send({ file: fileView(await receiveUpload(app, request, options)) }),
  );

  app.get('/api/files', async (request) => ({
    files: (await app.repos.files.listForUser(request.userId)).map(fileView),
  }));

  app.get<{ Params: IdParams }>('/api/files/:id', { schema: { params: IdParams } }, async (request) => {
    const file = await app.repos.files.findForUser(request.userId, request.params.id);
    if (!file) throw new NotFound();
    return { file: fileView(file) };
  });

  app.delete<{ Params: IdParams }>(
    '/api/files/:id',
    { schema: { params: IdParams } },
    async (request, reply) => {
      await deleteFile(app, request.userId, request.params.id);
      return reply.code(204).send();
    },
  );

  async function mint(userId: string, fileId: string) {
    const limit = options.mintRatePerMinute;
    const found = await app.repos.files.findForMint(userId, fileId, limit);
    if (!found) throw new NotFound();
    if (limit > 0 && found.minted > limit) throw mintRateLimited(app, found.retryAfterSeconds);
    return mintDownload(app, options.downloadOrigin, found.file, { userId });
  }

  app.post<{ Params: IdParams }>(
    '/api/files/:id/download-token',
    { schema: { params: IdParams } },
    async (request, reply) => reply.code(201).send(await mint(request.userId, request.params.id)),
  );

  // The link the UI shows: a fresh single-use token per click, so reloading or clicking again
  // always works. A GET that mints is safe here: it changes no state a third party could abuse,
  // and the token goes only to the signed-in browser that followed the link.
  app.get<{ Params: IdParams }>(
    '/files/:id/download',
    { schema: { params: IdParams }, config: { fileListOnError: true } },
    async (request, reply) => {
      const { url } = await mint(request.userId, request.params.id);
      return reply.header('cache-control', 'no-store').redirect(url, 303);
    },
  );
}
