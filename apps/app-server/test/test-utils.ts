import { readdir } from 'node:fs/promises';
import { join, relative } from 'node:path';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import { expect } from 'vitest';
import { TestClient } from './helpers.ts';

/** Asserts the status and the catalogue code of an `{ error, message }` body. */
export function expectError(response: LightMyRequestResponse, status: number, code: string): void {
  expect({ status: response.statusCode, body: response.json() }).toMatchObject({
    status,
    body: { error: code, message: expect.any(String) },
  });
}

/** The raw `Set-Cookie` header lines of a response. */
export function setCookies(response: LightMyRequestResponse): string[] {
  const header = response.headers['set-cookie'];
  if (header === undefined) return [];
  return Array.isArray(header) ? header : [header];
}

/** The `Set-Cookie` line that sets `name`, or `undefined`. */
export function setCookie(response: LightMyRequestResponse, name: string): string | undefined {
  return setCookies(response).find((line) => line.startsWith(`${name}=`));
}

/** The attributes of a `Set-Cookie` line, lower-cased names (`httponly`, `samesite`, ...). */
export function cookieAttributes(line: string): Map<string, string> {
  const [, ...attributes] = line.split(';');
  return new Map(
    attributes.map((attribute) => {
      const [key = '', ...value] = attribute.trim().split('=');
      return [key.toLowerCase(), value.join('=')];
    }),
  );
}

/** The session id inside a session cookie value `<id>.<signature>` (url-encoded on the wire). */
export function sessionIdOf(cookieValue: string): string {
  const decoded = decodeURIComponent(cookieValue);
  const dot = decoded.lastIndexOf('.');
  expect(dot).toBeGreaterThan(0);
  return decoded.slice(0, dot);
}

/** `SELECT count(*)` as a number. */
export async function count(app: FastifyInstance, sql: string, params: unknown[] = []): Promise<number> {
  const { rows } = await app.db.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${sql}`, params);
  return rows[0]?.n ?? 0;
}

/** Every regular file below `dir` (relative paths), skipping the directories named in `skip`. */
export async function walkFiles(dir: string, skip: string[] = []): Promise<string[]> {
  const found: string[] = [];
  async function walk(current: string): Promise<void> {
    const entries = await readdir(current, { withFileTypes: true }).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return [];
      throw error;
    });
    for (const entry of entries) {
      const path = join(current, entry.name);
      if (entry.isDirectory()) {
        if (!skip.includes(entry.name)) await walk(path);
      } else {
        found.push(relative(dir, path));
      }
    }
  }
  await walk(dir);
  return found;
}

/** A multipart body with one part, for uploads `TestClient.upload` cannot express. */
export function multipart(
  parts: { name: string; filename?: string; contentType?: string; content: string | Buffer }[],
): { payload: Buffer; headers: Record<string, string> } {
  const boundary = `----sfhtest${Math.random().toString(36).slice(2)}`;
  const chunks: Buffer[] = [];
  for (const part of parts) {
    const disposition = part.filename
      ? `form-data; name="${part.name}"; filename="${part.filename}"`
      : `form-data; name="${part.name}"`;
    const type = part.contentType ? `\r\nContent-Type: ${part.contentType}` : '';
    chunks.push(Buffer.from(`--${boundary}\r\nContent-Disposition: ${disposition}${type}\r\n\r\n`));
    chunks.push(Buffer.from(part.content));
    chunks.push(Buffer.from('\r\n'));
  }
  chunks.push(Buffer.from(`--${boundary}--\r\n`));
  return {
    payload: Buffer.concat(chunks),
    headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
  };
}

/** A client behind a TLS-terminating proxy: every request says it arrived over https. */
export class HttpsProxiedClient extends TestClient {
  override request(options: InjectOptions & { csrf?: boolean }): Promise<LightMyRequestResponse> {
    return super.request({
      ...options,
      headers: { ...(options.headers as Record<string, string>), 'x-forwarded-proto': 'https' },
    });
  }
}

/** A unique, valid username. */
export const username = (prefix = 'u') => `${prefix}${Math.random().toString(36).slice(2, 12)}`;
