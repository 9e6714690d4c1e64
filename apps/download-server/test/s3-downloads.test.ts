/**
 * B on the bucket (infra/s3-local.sh): the replay store is asked before the bucket, so a used or
 * refused token costs no `GetObject` (on S3, a billable request), and the claim of an object that
 * is missing is given back. The requests that reach the bucket are counted by a forwarding proxy
 * in front of it, so what is counted is what S3 would bill.
 */
import { once } from 'node:events';
import { createServer, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import type { FileClaims } from '@sfh/download-token';
import { decodeJwt } from 'jose';
import { nanoid } from 'nanoid';
import { beforeAll, describe, expect, it, onTestFinished, vi } from 'vitest';
import { freshPrefix, openS3Store, requireS3, S3_PORT, S3_SKIP, s3Env } from '../../../test/support/s3.ts';
import { buildTestApp } from './helpers.ts';

const TEN = Buffer.from('0123456789');

/** Forwards every request to the bucket and remembers its method and path. */
async function countingProxy(targetPort: number) {
  const seen: string[] = [];
  const server = createServer((incoming, outgoing) => {
    seen.push(`${incoming.method} ${incoming.url}`);
    const forward = request(
      {
        host: '127.0.0.1',
        port: targetPort,
        method: incoming.method,
        path: incoming.url,
        headers: incoming.headers,
      },
      (answer) => {
        outgoing.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(outgoing);
      },
    );
    forward.on('error', () => outgoing.destroy());
    incoming.pipe(forward);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  onTestFinished(() => {
    server.closeAllConnections();
    server.close();
  });
  return { port: (server.address() as AddressInfo).port, seen };
}

describe.skipIf(S3_SKIP)('B on S3: the replay store before the bucket', () => {
  beforeAll(requireS3);

  it('a used token, replayed 20 times, costs no GetObject; a missing object’s claim is given back', async () => {
    const proxy = await countingProxy(S3_PORT);
    const prefix = freshPrefix();
    const settings = s3Env(prefix, 'reader', `http://127.0.0.1:${proxy.port}`);
    for (const name of ['AWS_ENDPOINT_URL_S3', 'AWS_REGION', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'])
      vi.stubEnv(name, settings[name as keyof typeof settings]);
    const { store } = openS3Store('writer', {}, prefix);
    const stored = await store.put(Readable.from([TEN]));
    const file: FileClaims = {
      fid: nanoid(),
      obj: stored.id,
      name: 'ten.txt',
      ctype: 'text/plain',
      size: stored.size,
      sha256: stored.sha256,
    };
    const t = await buildTestApp(settings);
    const get = async (token: string, method: 'GET' | 'HEAD' = 'GET') =>
      (await t.app.inject({ method, url: `/d/${token}`, headers: { accept: 'application/json' } }))
        .statusCode;
    const reads = (id: string) =>
      proxy.seen.filter((line) => line.startsWith('GET') && line.includes(id)).length;

    const token = await t.mint(file);
    expect(await get(token)).toBe(200);
    expect(reads(stored.id)).toBe(1);
    for (let i = 0; i < 20; i++) expect(await get(token)).toBe(410);
    expect(await get(token, 'HEAD')).toBe(410);
    expect(reads(stored.id)).toBe(1);

    // A token for an object that is not in the bucket: 404 each time (one GetObject each), and
    // its claim given back every time, so more tries than a token has responses never make 410.
    const missing = await t.mint({ ...file, obj: `${stored.id.slice(0, -1)}x` });
    for (let i = 0; i < 34; i++) expect(await get(missing), `try ${i}`).toBe(404);
    expect(await t.app.replayStore.usage(decodeJwt(missing).jti as string)).toBeUndefined();
  });
});
