/**
 * `GET|HEAD /d/:token[/:name]` through `app.inject` against a real app: real key file, real disk
 * storage, real journal (README "How a download works", "One download per token", "Download server (B)").
 * Tokens are minted with the real signer; time is fixed with its `now` option, nothing sleeps.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FileClaims } from '@sfh/download-token';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { decodeJwt } from 'jose';
import { nanoid } from 'nanoid';
import { describe, expect, it, vi } from 'vitest';
import { buildTestApp, createUnknownKey, ISSUER, signRaw, type TestApp } from './helpers.ts';

const BROWSER_ACCEPT = 'text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8';
const TEN = Buffer.from('0123456789');
const MINUTE_MS = 60_000;

const SECURITY_HEADERS = {
  'cache-control': 'private, no-store',
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
};

const renewUrl = (file: FileClaims) => `${ISSUER}/files/${file.fid}/download`;
const jtiOf = (token: string) => decodeJwt(token).jti as string;

function download(
  app: FastifyInstance,
  token: string,
  options: { method?: 'GET' | 'HEAD'; headers?: Record<string, string>; suffix?: string } = {},
): Promise<LightMyRequestResponse> {
  return app.inject({
    method: options.method ?? 'GET',
    url: `/d/${token}${options.suffix ?? ''}`,
    headers: { accept: 'application/json', ...options.headers },
  });
}

function expectSecurityHeaders(res: LightMyRequestResponse): void {
  expect(res.headers).toMatchObject(SECURITY_HEADERS);
  expect(String(res.headers['content-security-policy'])).toContain('sandbox');
}

function expectError(res: LightMyRequestResponse, status: number, code: string): Record<string, unknown> {
  expect(res.statusCode, res.body).toBe(status);
  expect(String(res.headers['content-type'])).toMatch(/^application\/json/);
  const body = res.json() as Record<string, unknown>;
  expect(body.error).toBe(code);
  expect(typeof body.message).toBe('string');
  expectSecurityHeaders(res);
  return body;
}

/** An app with one stored file and a fresh token for it. */
async function withFile(bytes: Buffer = TEN, options: { name?: string; ctype?: string } = {}) {
  const t = await buildTestApp();
  const file = await t.putFile(bytes, options);
  const token = await t.mint(file);
  return { ...t, file, token };
}

describe('a valid token', () => {
  it('downloads the file once, with the bytes and every header of the design', async () => {
    const bytes = randomBytes(3000);
    const { app, file, token } = await withFile(bytes, { name: 'résumé 2026.pdf', ctype: 'image/png' });
    const res = await download(app, token);

    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(bytes)).toBe(true);
    expect(res.headers['content-type']).toBe('image/png');
    expect(res.headers['content-length']).toBe(String(bytes.length));
    const disposition = String(res.headers['content-disposition']);
    expect(disposition).toMatch(/^attachment;/);
    expect(disposition).toMatch(/^[\x20-\x7e]+$/); // the header itself is plain ASCII
    // An ASCII-only fallback for old clients (the library's choice of substitutes is its own).
    expect(disposition).toMatch(/; filename="[\x20-\x7e]*2026\.pdf"/);
    expect(disposition).toContain("filename*=UTF-8''r%C3%A9sum%C3%A9%202026.pdf");
    expect(res.headers.etag).toBe(`"${file.sha256}"`);
    const lastModified = String(res.headers['last-modified']);
    expect(new Date(lastModified).toUTCString()).toBe(lastModified);
    expect(res.headers['accept-ranges']).toBe('bytes');
    expectSecurityHeaders(res);
  });

  it('ignores a cosmetic trailing /name segment', async () => {
    const { app, file, token } = await withFile(TEN, { name: 'résumé 2026.pdf' });
    const res = await download(app, token, { suffix: `/${encodeURIComponent(file.name)}` });
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(TEN)).toBe(true);
    expect(String(res.headers['content-disposition'])).toContain("filename*=UTF-8''r%C3%A9sum%C3%A9");
    // The cosmetic URL consumed the same token.
    expectError(await download(app, token), 410, 'TOKEN_USED');
  });

  it('streams a larger file intact', async () => {
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    const { app, token } = await withFile(bytes);
    const res = await download(app, token);
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-length']).toBe(String(bytes.length));
    expect(res.rawPayload.equals(bytes)).toBe(true);
  });

  it('serves an empty file', async () => {
    const { app, token } = await withFile(Buffer.alloc(0));
    const res = await download(app, token);
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-length']).toBe('0');
    expect(res.rawPayload.length).toBe(0);
  });

  it.each(['text/plain', 'application/pdf', 'image/png'])(
    'keeps the passive content type %s',
    async (ctype) => {
      const { app, token } = await withFile(TEN, { ctype });
      const res = await download(app, token);
      expect(res.statusCode).toBe(200);
      expect(res.headers['content-type']).toBe(ctype);
    },
  );

  it.each([
    'text/html',
    'text/html; charset=utf-8',
    'image/svg+xml',
    'application/xhtml+xml',
    'text/xml',
    'application/xml',
    'application/javascript',
    'text/javascript',
  ])('serves active content %s as application/octet-stream', async (ctype) => {
    const { app, token } = await withFile(Buffer.from('<script>alert(1)</script>'), { ctype });
    const res = await download(app, token);
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toBe('application/octet-stream');
    expect(String(res.headers['content-disposition'])).toMatch(/^attachment/);
  });

  it.each(['TEXT/HTML', 'Image/SVG+XML'])(
    'treats media types case-insensitively: %s is served as application/octet-stream',
    async (ctype) => {
      // RFC 9110 §8.3.1: type and subtype are case-insensitive; browsers sniff them so.
      const { app, token } = await withFile(Buffer.from('<script>alert(1)</script>'), { ctype });
      const res = await download(app, token);
      expect(res.statusCode).toBe(200);
      expect(res.headers['content-type']).toBe('application/octet-stream');
    },
  );
});

describe('single use', () => {
  it('a second GET gets 410 TOKEN_USED with the renewal URL', async () => {
    const { app, file, token } = await withFile();
    expect((await download(app, token)).statusCode).toBe(200);
    const body = expectError(await download(app, token), 410, 'TOKEN_USED');
    expect(body.renewUrl).toBe(renewUrl(file));
  });

  it('a browser arriving with a used token is sent back to A (303)', async () => {
    const { app, file, token } = await withFile();
    expect((await download(app, token)).statusCode).toBe(200);
    const res = await download(app, token, { headers: { accept: BROWSER_ACCEPT } });
    expect(res.statusCode).toBe(303);
    expect(res.headers.location).toBe(renewUrl(file));
    expectSecurityHeaders(res);
  });

  it('a client accepting */* gets the JSON 410', async () => {
    const { app, file, token } = await withFile();
    expect((await download(app, token)).statusCode).toBe(200);
    const body = expectError(await download(app, token, { headers: { accept: '*/*' } }), 410, 'TOKEN_USED');
    expect(body.renewUrl).toBe(renewUrl(file));
  });

  it('HEAD does not consume the token', async () => {
    const { app, token } = await withFile();
    expect((await download(app, token, { method: 'HEAD' })).statusCode).toBe(200);
    expect((await download(app, token, { method: 'HEAD' })).statusCode).toBe(200);
    const res = await download(app, token);
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(TEN)).toBe(true);
    expect((await download(app, token, { method: 'HEAD' })).statusCode).toBe(410);
  });

  it('HEAD answers with the same headers as GET and no body', async () => {
    const { app, token } = await withFile(TEN, { name: 'résumé 2026.pdf', ctype: 'application/pdf' });
    const head = await download(app, token, { method: 'HEAD' });
    const get = await download(app, token);
    expect(head.statusCode).toBe(200);
    expect(get.statusCode).toBe(200);
    expect(head.rawPayload.length).toBe(0);
    for (const name of [
      'content-type',
      'content-length',
      'content-disposition',
      'etag',
      'last-modified',
      'accept-ranges',
      'cache-control',
      'x-content-type-options',
      'referrer-policy',
      'content-security-policy',
    ]) {
      expect(head.headers[name], name).toBeDefined();
      expect(head.headers[name], name).toBe(get.headers[name]);
    }
  });

  it('of 100 concurrent GETs with one token, exactly one gets the bytes', async () => {
    const { app, token } = await withFile();
    const responses = await Promise.all(Array.from({ length: 100 }, () => download(app, token)));
    const ok = responses.filter((res) => res.statusCode === 200);
    expect(ok).toHaveLength(1);
    expect(ok[0]?.rawPayload.equals(TEN)).toBe(true);
    const used = responses.filter((res) => res.statusCode === 410);
    expect(used).toHaveLength(99);
    for (const res of used) expect(res.json().error).toBe('TOKEN_USED');
  });

  it('a used token stays used after B restarts on the same data directory', async () => {
    const first = await buildTestApp();
    const file = await first.putFile(TEN);
    const token = await first.mint(file);
    expect((await download(first.app, token)).statusCode).toBe(200);
    await first.close();

    const second = await buildTestApp({}, { dir: first.dir, key: first.key });
    expect((await download(second.app, token, { method: 'HEAD' })).statusCode).toBe(410);
    expectError(await download(second.app, token), 410, 'TOKEN_USED');
    // The restarted B still serves fresh tokens.
    expect((await download(second.app, await second.mint(file))).statusCode).toBe(200);
  });

  it('a used token stays used across several quick restarts (a crash loop)', async () => {
    const first = await buildTestApp();
    const file = await first.putFile(TEN);
    const token = await first.mint(file);
    expect((await download(first.app, token)).statusCode).toBe(200);
    await first.close();

    for (let restart = 1; restart <= 4; restart++) {
      const again = await buildTestApp({}, { dir: first.dir, key: first.key });
      const res = await download(again.app, token, { method: 'HEAD' });
      await again.close();
      expect(res.statusCode, `restart ${restart}`).toBe(410);
    }
  });

  it('fails closed with 503 REPLAY_STORE_UNAVAILABLE when the replay store cannot reserve', async () => {
    const { app, token } = await withFile();
    vi.spyOn(app.replayStore, 'reserve').mockRejectedValue(new Error('replay store down'));
    const res = await download(app, token);
    expectError(res, 503, 'REPLAY_STORE_UNAVAILABLE');
    expect(res.headers['retry-after']).toBeDefined();
    expect(res.rawPayload.includes(TEN)).toBe(false);
  });

  it('HEAD fails closed with 503 when the replay store cannot answer', async () => {
    const { app, token } = await withFile();
    vi.spyOn(app.replayStore, 'usage').mockRejectedValue(new Error('replay store down'));
    const res = await download(app, token, { method: 'HEAD' });
    expect(res.statusCode).toBe(503);
    expect(res.headers['retry-after']).toBeDefined();
  });
});

describe('one download per token: byte ranges', () => {
  const FORTY = randomBytes(40);
  const metric = async (app: FastifyInstance, line: RegExp) =>
    Number(line.exec((await app.inject({ method: 'GET', url: '/metrics' })).body)?.[1] ?? 'NaN');

  it('ranges in any order are each served once; the union is the file; an overlap is 410 with renewUrl', async () => {
    const { app, file, token } = await withFile(FORTY);
    const parts = new Map<number, Buffer>();
    for (const [start, end] of [
      [10, 19],
      [0, 9],
      [30, 39],
      [20, 29],
    ] as const) {
      const res = await download(app, token, { headers: { range: `bytes=${start}-${end}` } });
      expect(res.statusCode, `${start}-${end}`).toBe(206);
      parts.set(start, res.rawPayload);
    }
    const joined = Buffer.concat([...parts.entries()].sort((a, b) => a[0] - b[0]).map(([, part]) => part));
    expect(joined.equals(FORTY)).toBe(true);
    for (const range of ['bytes=19-20', 'bytes=0-', 'bytes=-1']) {
      const body = expectError(await download(app, token, { headers: { range } }), 410, 'TOKEN_USED');
      expect(body.renewUrl).toBe(renewUrl(file));
    }
    expectError(await download(app, token), 410, 'TOKEN_USED');
    expect(await metric(app, /^download_refusals_total\{cause="overlap"\} (\d+)$/m)).toBe(4);
  });

  it('a full GET after a range is refused (it would resend that range); the rest by range is served', async () => {
    const { app, token } = await withFile(FORTY);
    expect((await download(app, token, { headers: { range: 'bytes=0-9' } })).statusCode).toBe(206);
    expectError(await download(app, token), 410, 'TOKEN_USED');
    const rest = await download(app, token, { headers: { range: 'bytes=10-' } });
    expect(rest.statusCode).toBe(206);
    expect(rest.rawPayload.equals(FORTY.subarray(10))).toBe(true);
  });

  it('HEAD answers as GET would for that range, and reserves nothing', async () => {
    const { app, token } = await withFile(FORTY);
    expect((await download(app, token, { headers: { range: 'bytes=0-9' } })).statusCode).toBe(206);
    expect((await download(app, token, { method: 'HEAD', headers: { range: 'bytes=10-' } })).statusCode).toBe(
      206,
    );
    expect((await download(app, token, { method: 'HEAD', headers: { range: 'bytes=5-' } })).statusCode).toBe(
      410,
    );
    expect((await download(app, token, { method: 'HEAD' })).statusCode).toBe(410);
    expect(await app.replayStore.usage(jtiOf(token))).toEqual({ ranges: [0, 10], bytes: 10, responses: 1 });
  });

  it('at most 32 responses per token: the 33rd is 410, however small and new its range', async () => {
    const { app, token } = await withFile(FORTY);
    for (let i = 0; i < 32; i++)
      expect((await download(app, token, { headers: { range: `bytes=${i}-${i}` } })).statusCode).toBe(206);
    expectError(await download(app, token, { headers: { range: 'bytes=35-35' } }), 410, 'TOKEN_USED');
    expect(await metric(app, /^download_refusals_total\{cause="responses"\} (\d+)$/m)).toBe(1);
  });

  it('a client that goes away early gets the unsent tail back, from RESEND_MARGIN_BYTES before the last written byte', async () => {
    // The default margin: the client (undici here) holds bytes it has not handed to the reader yet,
    // so what stays reserved must end before what the reader got, or the resume would lose bytes.
    const margin = 16 * 1024 * 1024;
    const big = randomBytes(48 * 1024 * 1024);
    const t = await buildTestApp();
    const file = await t.putFile(big);
    const token = await t.mint(file);
    const origin = await t.app.listen({ port: 0, host: '127.0.0.1' });
    // Read a little, then drop the connection.
    const controller = new AbortController();
    const res = await fetch(`${origin}/d/${token}`, { signal: controller.signal });
    expect(res.status).toBe(200);
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    let received = 0;
    while (received < 24 * 1024 * 1024) received += ((await reader.read()).value as Uint8Array).length;
    controller.abort();
    await vi.waitFor(async () => expect(await metric(t.app, /^download_releases_total (\d+)$/m)).toBe(1));

    const usage = await t.app.replayStore.usage(jtiOf(token));
    const kept = usage?.ranges[1] as number;
    expect(usage?.ranges).toEqual([0, kept]);
    expect(usage?.responses).toBe(1);
    // What stays reserved ends RESEND_MARGIN_BYTES before what B wrote (at least what we got).
    expect(kept).toBeGreaterThan(0);
    expect(kept).toBeLessThanOrEqual(received);
    expect(usage?.bytes).toBe(kept + margin);
    expect(await metric(t.app, /^download_resend_margin_bytes_total (\d+)$/m)).toBe(margin);

    const replay = await fetch(`${origin}/d/${token}`, { headers: { accept: 'application/json' } });
    expect(replay.status).toBe(410);
    await replay.body?.cancel();
    const resume = await fetch(`${origin}/d/${token}`, { headers: { range: `bytes=${received}-` } });
    expect(resume.status).toBe(206);
    const tail = Buffer.from(await resume.arrayBuffer());
    expect(tail.equals(big.subarray(received))).toBe(true);
  });
});

describe('ranges', () => {
  async function rangeOf(range: string, headers: Record<string, string> = {}, bytes: Buffer = TEN) {
    const t = await withFile(bytes);
    const res = await download(t.app, t.token, { headers: { range, ...headers } });
    return { ...t, res };
  }

  // Which range a header selects is range.test.ts (property-based, against RFC 9110); here, what
  // the route does with it.
  it('bytes=5-100 → 206 with the clamped range, exact bytes and headers', async () => {
    const { res } = await rangeOf('bytes=5-100');
    expect(res.statusCode, res.body).toBe(206);
    expect(res.headers['content-range']).toBe(`bytes 5-9/${TEN.length}`);
    expect(res.headers['content-length']).toBe('5');
    expect(res.rawPayload.equals(TEN.subarray(5))).toBe(true);
    expect(res.headers['accept-ranges']).toBe('bytes');
    expect(res.headers.etag).toBeDefined();
  });

  it.each([
    ['starts past the end', 'bytes=10-20', TEN],
    ['starts exactly at the end (curl -C -, wget -c on a complete file)', 'bytes=10-', TEN],
    ['is open on an empty file', 'bytes=0-', Buffer.alloc(0)],
    ['is any int-range of an empty file', 'bytes=0-0', Buffer.alloc(0)],
  ])(
    'a range that %s → 416 with bytes */size, and the token is not consumed',
    async (_label, range, bytes) => {
      const { app, token, res } = await rangeOf(range, {}, bytes);
      expectError(res, 416, 'RANGE_NOT_SATISFIABLE');
      expect(res.headers['content-range']).toBe(`bytes */${bytes.length}`);
      expect(await app.replayStore.usage(jtiOf(token))).toBeUndefined();
      const after = await download(app, token);
      expect(after.statusCode).toBe(200);
      expect(after.rawPayload.equals(bytes)).toBe(true);
    },
  );

  it('HEAD with a range answers 206 like GET, without consuming the token', async () => {
    const { app, token } = await withFile();
    const head = await download(app, token, { method: 'HEAD', headers: { range: 'bytes=2-5' } });
    expect(head.statusCode).toBe(206);
    expect(head.headers['content-range']).toBe('bytes 2-5/10');
    expect(head.headers['content-length']).toBe('4');
    expect(head.rawPayload.length).toBe(0);
    const get = await download(app, token, { headers: { range: 'bytes=2-5' } });
    expect(get.statusCode).toBe(206);
    expect(get.rawPayload.toString()).toBe('2345');
  });

  it('several ranges get the whole file (documented policy: never multipart)', async () => {
    const { res } = await rangeOf('bytes=0-1,5-6');
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-range']).toBeUndefined();
    expect(String(res.headers['content-type'])).not.toMatch(/multipart/);
    expect(res.rawPayload.equals(TEN)).toBe(true);
  });

  it('a flood of tiny ranges never multiplies the response', async () => {
    const bytes = randomBytes(4096);
    const range = `bytes=${Array.from({ length: 1000 }, (_, i) => `${i * 4}-${i * 4}`).join(',')}`;
    const { res } = await rangeOf(range, {}, bytes);
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-length']).toBe(String(bytes.length));
    expect(res.rawPayload.equals(bytes)).toBe(true);
  });

  it('If-Range with the current ETag → 206', async () => {
    const t = await withFile();
    const res = await download(t.app, t.token, {
      headers: { range: 'bytes=0-4', 'if-range': `"${t.file.sha256}"` },
    });
    expect(res.statusCode).toBe(206);
    expect(res.rawPayload.toString()).toBe('01234');
  });

  it('If-Range resumes across tokens: the ETag is the content hash', async () => {
    const t = await withFile();
    const first = await download(t.app, t.token, { headers: { range: 'bytes=0-4' } });
    expect(first.statusCode).toBe(206);
    const second = await download(t.app, await t.mint(t.file), {
      headers: { range: 'bytes=5-', 'if-range': String(first.headers.etag) },
    });
    expect(second.statusCode).toBe(206);
    expect(Buffer.concat([first.rawPayload, second.rawPayload]).equals(TEN)).toBe(true);
  });

  it('If-Range with the Last-Modified date → 206', async () => {
    const t = await withFile();
    const head = await download(t.app, t.token, { method: 'HEAD' });
    const res = await download(t.app, t.token, {
      headers: { range: 'bytes=0-4', 'if-range': String(head.headers['last-modified']) },
    });
    expect(res.statusCode).toBe(206);
  });

  it.each([
    ['another ETag', `"${'0'.repeat(64)}"`],
    ['a weak ETag of the same content', 'weak'],
    ['another date', 'Thu, 01 Jan 2004 00:00:00 GMT'],
  ])('a stale If-Range (%s) → 200, whole file', async (_label, validator) => {
    const t = await withFile();
    const ifRange = validator === 'weak' ? `W/"${t.file.sha256}"` : validator;
    const res = await download(t.app, t.token, { headers: { range: 'bytes=0-4', 'if-range': ifRange } });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-range']).toBeUndefined();
    expect(res.rawPayload.equals(TEN)).toBe(true);
  });
});

describe('missing bytes', () => {
  it('a deleted object → 404 FILE_NOT_FOUND, and the token is not consumed', async () => {
    const { app, storage, file, token } = await withFile();
    await storage.delete(file.obj);
    expectError(await download(app, token), 404, 'FILE_NOT_FOUND');
    expect(await app.replayStore.usage(jtiOf(token))).toBeUndefined();
    // Still 404, never 410: nothing was claimed.
    expect((await download(app, token, { method: 'HEAD' })).statusCode).toBe(404);
    expectError(await download(app, token), 404, 'FILE_NOT_FOUND');
  });

  it('a size that disagrees with the token → 404 FILE_NOT_FOUND, not consumed', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const token = await t.mint({ ...file, size: file.size + 1 });
    expectError(await download(t.app, token), 404, 'FILE_NOT_FOUND');
    expect(await t.app.replayStore.usage(jtiOf(token))).toBeUndefined();
  });
});

describe('the replay store before storage: a refused token costs no storage request', () => {
  it('a used token, replayed by GET and HEAD, and an overlapping range get 410 without opening the object', async () => {
    const { app, token } = await withFile();
    const read = vi.spyOn(app.storage, 'read');
    expect((await download(app, token)).statusCode).toBe(200);
    expect(read).toHaveBeenCalledTimes(1);
    for (let i = 0; i < 20; i++) expectError(await download(app, token), 410, 'TOKEN_USED');
    expect((await download(app, token, { method: 'HEAD' })).statusCode).toBe(410);
    expectError(await download(app, token, { headers: { range: 'bytes=3-5' } }), 410, 'TOKEN_USED');
    // A stale If-Range asks for the whole file, which is as used.
    const stale = { range: 'bytes=0-4', 'if-range': 'Thu, 01 Jan 2004 00:00:00 GMT' };
    expectError(await download(app, token, { headers: stale }), 410, 'TOKEN_USED');
    expect(read).toHaveBeenCalledTimes(1);
  });

  it('a token past its response bound gets 410 without opening the object', async () => {
    const { app, token } = await withFile();
    const read = vi.spyOn(app.storage, 'read');
    for (let i = 0; i < 32; i++)
      expect(
        (await download(app, token, { headers: { range: `bytes=${i % 10}-${i % 10}` } })).statusCode,
      ).toBe(i < 10 ? 206 : 410);
    expect(read).toHaveBeenCalledTimes(10);
  });

  it('a reservation whose object is missing is given back whole: 40 tries later the token is as new', async () => {
    const { app, config, file, token } = await withFile();
    // Taken away and put back (B has never opened it, so no descriptor of it is kept open).
    const path = join(config.storageDir, file.obj.slice(0, 2), file.obj);
    await rename(path, `${path}.away`);
    // More tries than the 32 responses a token may have: none of them counted.
    for (let i = 0; i < 40; i++) expectError(await download(app, token), 404, 'FILE_NOT_FOUND');
    expect(await app.replayStore.usage(jtiOf(token))).toBeUndefined();
    await rename(`${path}.away`, path);
    const res = await download(app, token);
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(TEN)).toBe(true);
  });

  it('a reservation whose read fails (storage down) is given back: 503, then the token still works', async () => {
    const { app, token } = await withFile();
    vi.spyOn(app.storage, 'read').mockRejectedValueOnce(new Error('storage down'));
    expectError(await download(app, token), 503, 'STORAGE_UNAVAILABLE');
    expect(await app.replayStore.usage(jtiOf(token))).toBeUndefined();
    const res = await download(app, token);
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(TEN)).toBe(true);
  });
});

describe('a browser refused without a way to renew', () => {
  it('gets a small HTML page with the status, the reason and a link back to A; other clients keep the JSON', async () => {
    const { app, storage, file, token } = await withFile();
    await storage.delete(file.obj);
    const gone = await download(app, token, { headers: { accept: BROWSER_ACCEPT } });
    expect(gone.statusCode).toBe(404);
    expect(gone.headers['content-type']).toBe('text/html; charset=utf-8');
    expect(gone.body).toContain('The file no longer exists.');
    expect(gone.body).toContain('<a href="http://a.test/">Back to your files, for a fresh link</a>');
    const forged = await download(app, `${token.slice(0, -4)}AAAA`, { headers: { accept: BROWSER_ACCEPT } });
    expect(forged.statusCode).toBe(403);
    expect(forged.body).toContain('Download token is not valid.');
    expectError(await download(app, token), 404, 'FILE_NOT_FOUND');
  });

  it('a malformed token in the page is shown escaped', async () => {
    const t = await buildTestApp();
    const res = await download(t.app, '<script>x</script>', { headers: { accept: BROWSER_ACCEPT } });
    expect(res.statusCode).toBe(400);
    expect(res.body).not.toContain('<script>');
  });
});

describe('token errors', () => {
  it.each([
    ['abc', 'abc'],
    ['two segments', 'eyJhIjoxfQ.eyJhIjoxfQ'],
    ['segments that are not JSON objects', 'YWJj.YWJj.YWJj'],
    ['a 5000-character token', 'a'.repeat(5000)],
  ])('%s → 400 TOKEN_MALFORMED', async (_label, token) => {
    const t = await buildTestApp();
    expectError(await download(t.app, token), 400, 'TOKEN_MALFORMED');
  });

  it('a 5000-character token of three segments → 400 TOKEN_MALFORMED, never 414', async () => {
    const t = await buildTestApp();
    const token = `${'a'.repeat(2000)}.${'b'.repeat(2000)}.${'c'.repeat(1000)}`;
    expectError(await download(t.app, token), 400, 'TOKEN_MALFORMED');
  });

  it('a 15000-character path → 400, never 414', async () => {
    const t = await buildTestApp();
    const res = await t.app.inject({ method: 'GET', url: `/d/${'a'.repeat(15_000 - 3)}` });
    expectError(res, 400, 'TOKEN_MALFORMED');
  });

  it('a signature by a key B does not know → 403 TOKEN_INVALID', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const attacker = await createUnknownKey();
    expectError(
      await download(t.app, await t.mint(file, { key: attacker.privateKey, kid: attacker.kid })),
      403,
      'TOKEN_INVALID',
    );
    // Even under the real key's kid.
    expectError(
      await download(t.app, await t.mint(file, { key: attacker.privateKey })),
      403,
      'TOKEN_INVALID',
    );
  });

  it('an unsigned token (alg none) → 403 TOKEN_INVALID', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const real = decodeJwt(await t.mint(file));
    const segment = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
    const token = `${segment({ alg: 'none', kid: t.key.kid, typ: 'dl+jwt' })}.${segment(real)}.`;
    expectError(await download(t.app, token), 403, 'TOKEN_INVALID');
  });

  it('an expired token → 403 TOKEN_EXPIRED with the renewal URL; a browser gets 303', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const token = await t.mint(file, { now: new Date(Date.now() - 10 * MINUTE_MS) });
    const body = expectError(await download(t.app, token), 403, 'TOKEN_EXPIRED');
    expect(body.renewUrl).toBe(renewUrl(file));
    const browser = await download(t.app, token, { headers: { accept: BROWSER_ACCEPT } });
    expect(browser.statusCode).toBe(303);
    expect(browser.headers.location).toBe(renewUrl(file));
  });

  it('a token older than TOKEN_MAX_AGE_SECONDS → 403 TOKEN_EXPIRED even before its exp', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    // iat 400 s ago, exp 200 s ahead: the maximum age (300 s) decides.
    const token = await t.mint(file, { now: new Date(Date.now() - 400_000), ttlSeconds: 600 });
    expectError(await download(t.app, token), 403, 'TOKEN_EXPIRED');
  });

  it('a token from the future (beyond the clock tolerance) → 403 TOKEN_INVALID', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const token = await t.mint(file, { now: new Date(Date.now() + 2 * MINUTE_MS) });
    expectError(await download(t.app, token), 403, 'TOKEN_INVALID');
  });

  it.each([
    ['audience', { audience: 'http://other.test' }],
    ['issuer', { issuer: 'http://other.test' }],
  ])('a token for another %s → 403 TOKEN_INVALID', async (_label, mint) => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    expectError(await download(t.app, await t.mint(file, mint)), 403, 'TOKEN_INVALID');
  });

  it('a forged token carrying a real token’s jti cannot burn it (verify before claim)', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const real = await t.mint(file);
    const attacker = await createUnknownKey(t.key.kid);
    const forged = await signRaw({ ...decodeJwt(real) }, attacker, { kid: t.key.kid });
    expect(jtiOf(forged)).toBe(jtiOf(real));

    expectError(await download(t.app, forged), 403, 'TOKEN_INVALID');
    expectError(await download(t.app, forged), 403, 'TOKEN_INVALID');
    expect(await t.app.replayStore.usage(jtiOf(real))).toBeUndefined();
    const res = await download(t.app, real);
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(TEN)).toBe(true);
  });

  it('an invalid token never reaches storage: a forgery naming a missing object gets 403, not 404', async () => {
    const t = await buildTestApp();
    const file = await t.putFile(TEN);
    const claims = { ...decodeJwt(await t.mint(file)), obj: nanoid(), jti: nanoid() };
    const forged = await signRaw(claims, await createUnknownKey(t.key.kid));
    expectError(await download(t.app, forged), 403, 'TOKEN_INVALID');
  });
});

describe('keys unavailable', () => {
  async function withoutKeys(): Promise<TestApp> {
    return buildTestApp({ JWKS_FILE: join(tmpdir(), `missing-${nanoid()}`, 'jwks.json') });
  }

  it('a well-formed token → 503 KEYS_UNAVAILABLE with Retry-After', async () => {
    const t = await withoutKeys();
    const file = await t.putFile(TEN);
    const res = await download(t.app, await t.mint(file));
    expectError(res, 503, 'KEYS_UNAVAILABLE');
    expect(res.headers['retry-after']).toBeDefined();
  });

  it('/readyz → 503 naming keys; /healthz → 200', async () => {
    const t = await withoutKeys();
    const ready = await t.app.inject({ method: 'GET', url: '/readyz' });
    expect(ready.statusCode).toBe(503);
    expect(ready.json().missing).toContain('keys');
    const health = await t.app.inject({ method: 'GET', url: '/healthz' });
    expect(health.statusCode).toBe(200);
  });

  it('downloads work once the key set can be read', async () => {
    const t = await withoutKeys();
    const file = await t.putFile(TEN);
    const token = await t.mint(file);
    expect((await download(t.app, token)).statusCode).toBe(503);
    // The app's key source is the missing file; publish the key there and reload.
    const source = t.config.jwksSource as { file: string };
    await mkdir(join(source.file, '..'), { recursive: true });
    await writeFile(
      source.file,
      JSON.stringify({ keys: [{ ...t.key.publicJwk, kid: t.key.kid, alg: 'EdDSA', use: 'sig' }] }),
      { mode: 0o644 },
    );
    await t.app.keys.refresh();
    expect((await t.app.inject({ method: 'GET', url: '/readyz' })).statusCode).toBe(200);
    expect((await download(t.app, token)).statusCode).toBe(200);
  });
});

describe('health and unknown routes', () => {
  it('/readyz → 200 ready when keys and the replay store are there', async () => {
    const t = await buildTestApp();
    const res = await t.app.inject({ method: 'GET', url: '/readyz' });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({ status: 'ready', missing: [] });
  });

  it('/readyz → 503 naming the replay store when it cannot answer', async () => {
    const t = await buildTestApp();
    vi.spyOn(t.app.replayStore, 'ping').mockRejectedValue(new Error('down'));
    const res = await t.app.inject({ method: 'GET', url: '/readyz' });
    expect(res.statusCode).toBe(503);
    expect(res.json().missing).toEqual(['replay-store']);
  });

  it('an unknown route → 404 NOT_FOUND JSON with the security headers', async () => {
    const t = await buildTestApp();
    expectError(await t.app.inject({ method: 'GET', url: '/nope' }), 404, 'NOT_FOUND');
    expectError(await t.app.inject({ method: 'POST', url: '/d/abc' }), 404, 'NOT_FOUND');
  });
});
