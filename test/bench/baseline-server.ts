/**
 * The baselines B is compared with, as a process of their own (like B), serving the files of
 * `DIR` at `/<name>`:
 * - `MODE=http`: plain `node:http`, no checks at all, answering as a file server does: the
 *   size known (read once per file), `Content-Length`, then `fs.createReadStream(file, { end })`
 *   piped into the response, which reads exactly the file's bytes, into a buffer no larger than
 *   them (B reads the same way). `?hwm=262144` for B's 256 KiB reads instead of the default
 *   64 KiB. Two extra rows, not references: `?pipe` streams without passing the end (a 64 KiB
 *   buffer for a 4 KiB file, and one more read to find the end of the file), `?chunked` also
 *   sends no `Content-Length` (every response chunked; no file server answers a file that way);
 * - `MODE=static`: fastify (no logger) with `@fastify/static`.
 */
import { createReadStream, existsSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import fastifyStatic from '@fastify/static';
import Fastify from 'fastify';

const dir = process.env.DIR as string;
const port = Number(process.env.PORT);
const mode = process.env.MODE;

if (mode === 'http') {
  // A file's size is read on its first request only: after that the request path does nothing
  // but open and stream.
  const files = new Map<string, { path: string; size: number }>();
  const lookUp = (url: string) => {
    let file = files.get(url);
    if (!file && /^\/[\w.-]+$/.test(url) && existsSync(join(dir, url))) {
      const path = join(dir, url);
      file = { path, size: statSync(path).size };
      files.set(url, file);
    }
    return file;
  };
  const server = createServer((request, response) => {
    const [path = '', query] = (request.url ?? '').split('?');
    const params = new URLSearchParams(query);
    const hwm = params.has('hwm') ? Number(params.get('hwm')) : undefined;
    const file = lookUp(path);
    if (!file) {
      response.writeHead(404).end();
      return;
    }
    const chunked = params.has('chunked');
    response.writeHead(200, {
      'content-type': 'application/octet-stream',
      ...(chunked ? {} : { 'content-length': file.size }),
    });
    if (request.method === 'HEAD') {
      response.end();
      return;
    }
    const stream = createReadStream(file.path, {
      ...(hwm ? { highWaterMark: hwm } : {}),
      ...(chunked || params.has('pipe') ? {} : { end: file.size - 1 }),
    });
    stream.on('error', () => response.destroy());
    response.on('close', () => stream.destroy());
    stream.pipe(response);
  });
  server.listen(port, '127.0.0.1');
  process.on('SIGTERM', () => {
    server.close();
    server.closeAllConnections();
  });
} else if (mode === 'static') {
  const app = Fastify({ logger: false });
  await app.register(fastifyStatic, { root: dir });
  await app.listen({ port, host: '127.0.0.1' });
  process.on('SIGTERM', () => {
    app.server.closeAllConnections();
    void app.close();
  });
} else {
  throw new Error(`MODE must be http or static, not ${mode}`);
}
