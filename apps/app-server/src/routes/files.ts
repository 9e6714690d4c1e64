import { MAX_FILE_NAME_LENGTH } from '@sfh/download-token';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { nanoid } from 'nanoid';
import { FileTooLarge, NotFound, ValidationFailed } from '../errors.ts';
import type { FileRecord } from '../repositories/files.ts';

export interface FilesOptions {
  maxUploadBytes: number;
  downloadOrigin: string;
}

const IdParams = Type.Object({ id: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' }) });
type IdParams = { id: string };

// Names are metadata, never paths; control characters would only make trouble in headers and logs.
// biome-ignore lint/suspicious/noControlCharactersInRegex: that is the point
const BAD_NAME = /[\u0000-\u001f\u007f]/;
const MIME_TYPE = /^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}\/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$/;

// busboy's parse errors (no boundary, a body cut short) carry no status: the client sent a
// broken multipart body, which is a 400, not a server error.
const MULTIPART_PARSE_ERROR = /^(Multipart: |Unexpected end of|Malformed part header)/;
function rethrowMalformed(error: unknown): never {
  if (error instanceof Error && !('code' in error) && MULTIPART_PARSE_ERROR.test(error.message)) {
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

/** The signed-in user's files: upload, list, get, delete, and download tokens for them. */
export default async function fileRoutes(app: FastifyInstance, options: FilesOptions) {
  app.addHook('onRequest', app.requireUser);

  app.post('/api/files', async (request, reply) => {
    const part = await request
      .file({ limits: { fileSize: options.maxUploadBytes, files: 1, fields: 4, parts: 5 } })
      .catch(rethrowMalformed);
    if (part?.fieldname !== 'file') {
      part?.file.resume();
      throw new ValidationFailed('Send the file as a multipart field named "file"');
    }
    const name = part.filename.normalize('NFC');
    if (
      name.length === 0 ||
      name.length > MAX_FILE_NAME_LENGTH ||
      BAD_NAME.test(name) ||
      name === '.' ||
      name === '..'
    ) {
      part.file.resume();
      throw new ValidationFailed(
        `File names must have 1 to ${MAX_FILE_NAME_LENGTH} characters and no control characters`,
      );
    }
    const mimeType = part.mimetype.toLowerCase();
    const contentType = MIME_TYPE.test(mimeType) ? mimeType : 'application/octet-stream';
    // busboy ends a file that hits the limit as if it were complete. Failing the stream makes
    // the store discard what it wrote so far; the `truncated` check below catches a limit that
    // was reached before this listener existed (a small body parsed in one go).
    const tooLarge = () => new FileTooLarge(options.maxUploadBytes);
    part.file.once('limit', () => part.file.destroy(tooLarge()));
    const stored = await app.storage.put(part.file).catch(rethrowMalformed);
    if (part.file.truncated) {
      await app.storage.delete(stored.id);
      throw tooLarge();
    }
    let file: FileRecord;
    try {
      file = await app.repos.files.create({
        id: nanoid(),
        userId: request.userId,
        objectId: stored.id,
        name,
        contentType,
        size: stored.size,
        sha256: stored.sha256,
      });
    } catch (error) {
      // Bytes without a row would be unreachable garbage.
      await app.storage.delete(stored.id);
      throw error;
    }
    return reply.code(201).send({ file: fileView(file) });
  });

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
      const file = await app.repos.files.deleteForUser(request.userId, request.params.id);
      if (!file) throw new NotFound();
      // The bytes go at once: a token minted before the delete then gets 404 from B.
      await app.storage.delete(file.objectId);
      return reply.code(204).send();
    },
  );

  async function mint(userId: string, fileId: string) {
    const file = await app.repos.files.findForUser(userId, fileId);
    if (!file) throw new NotFound();
    const { token, expiresAt } = await app.tokens.mint(
      {
        fid: file.id,
        obj: file.objectId,
        name: file.name,
        ctype: file.contentType,
        size: file.size,
        sha256: file.sha256,
      },
      userId,
    );
    // The trailing name is cosmetic, for tools that name files after the URL.
    const url = `${options.downloadOrigin}/d/${token}/${encodeURIComponent(file.name)}`;
    return { url, token, expiresAt: expiresAt.toISOString() };
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
    { schema: { params: IdParams } },
    async (request, reply) => {
      const { url } = await mint(request.userId, request.params.id);
      return reply.header('cache-control', 'no-store').redirect(url, 303);
    },
  );
}
