import { createHash, randomBytes } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionClient } from '../support/http-client.ts';
import type { ServerProcess } from '../support/processes.ts';
import { bucketContents, S3_SKIP } from '../support/s3.ts';
import { type Stack, startStack } from '../support/stack.ts';

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

// The whole path with both servers as real processes: embedded PGlite always (what `npm start`
// runs), and the real Postgres as well when TEST_DATABASE_URL is set (CI).
// And once with the bytes in S3 (infra/s3-local.sh), A and B on DATA_DIRs of their own, B with
// read-only credentials: they share nothing but the bucket.
const databases = ['embedded', ...(process.env.TEST_DATABASE_URL ? (['postgres'] as const) : [])] as const;
const stacks = [
  ...databases.map((database) => ({ database, storage: 'local' as const })),
  ...(S3_SKIP ? [] : [{ database: 'embedded' as const, storage: 's3' as const }]),
];

describe.each(stacks)(
  'sign in on A, download once from B ($database database, $storage storage)',
  ({ database, storage }) => {
    let stack: Stack;
    let dataDir: string;
    let a: ServerProcess;
    let b: ServerProcess;
    let appOrigin: string;
    let downloadOrigin: string;

    beforeAll(async () => {
      stack = await startStack({ database, storage });
      ({ dataDir, a, b, appOrigin, downloadOrigin } = stack);
    }, 120_000);

    afterAll(() => stack?.stop());

    it('register → login → upload → mint → download → compare bytes → reuse is refused', async () => {
      const user = new SessionClient(appOrigin);
      const credentials = JSON.stringify({ username: 'alice', password: 'correct horse battery' });
      const json = { 'content-type': 'application/json' };
      expect(
        (await user.fetch('/api/auth/register', { method: 'POST', headers: json, body: credentials })).status,
      ).toBe(201);
      expect((await user.fetch('/api/auth/logout', { method: 'POST' })).status).toBe(204);
      expect((await user.fetch('/api/me')).status).toBe(401);
      expect(
        (await user.fetch('/api/auth/login', { method: 'POST', headers: json, body: credentials })).status,
      ).toBe(200);

      const bytes = randomBytes(3 * 1024 * 1024 + 17);
      const form = new FormData();
      form.append('file', new Blob([bytes], { type: 'application/pdf' }), 'rapport été.pdf');
      const upload = await user.json<{ file: { id: string; size: number; sha256: string } }>('/api/files', {
        method: 'POST',
        body: form,
      });
      expect(upload.status).toBe(201);
      expect(upload.body.file).toMatchObject({ size: bytes.length, sha256: sha256(bytes) });
      if (stack.s3Prefix !== undefined) expect(await bucketContents(stack.s3Prefix)).toHaveLength(1);

      const mint = await user.json<{ url: string; token: string; expiresAt: string }>(
        `/api/files/${upload.body.file.id}/download-token`,
        { method: 'POST' },
      );
      expect(mint.status).toBe(201);
      expect(mint.body.url.startsWith(`${downloadOrigin}/d/${mint.body.token}`)).toBe(true);

      const download = await fetch(mint.body.url);
      expect(download.status).toBe(200);
      expect(download.headers.get('content-disposition')).toContain(
        "filename*=UTF-8''rapport%20%C3%A9t%C3%A9.pdf",
      );
      const received = new Uint8Array(await download.arrayBuffer());
      expect(received.length).toBe(bytes.length);
      expect(sha256(received)).toBe(sha256(bytes));

      const reuse = await fetch(mint.body.url);
      expect(reuse.status).toBe(410);
      expect(await reuse.json()).toMatchObject({
        error: 'TOKEN_USED',
        renewUrl: `${appOrigin}/files/${upload.body.file.id}/download`,
      });

      // The link the UI shows mints a fresh token per click.
      const click = await user.fetch(`/files/${upload.body.file.id}/download`);
      expect(click.status).toBe(303);
      const again = await fetch(click.headers.get('location') as string);
      expect(again.status).toBe(200);
      expect(sha256(new Uint8Array(await again.arrayBuffer()))).toBe(sha256(bytes));
    });

    it('a file deleted on A is gone from B at once', async () => {
      const user = new SessionClient(appOrigin);
      const credentials = JSON.stringify({ username: 'bob', password: 'correct horse battery' });
      await user.fetch('/api/auth/register', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: credentials,
      });
      const form = new FormData();
      form.append('file', new Blob(['short-lived']), 'note.txt');
      const { body } = await user.json<{ file: { id: string } }>('/api/files', {
        method: 'POST',
        body: form,
      });
      const mint = await user.json<{ url: string }>(`/api/files/${body.file.id}/download-token`, {
        method: 'POST',
      });
      expect((await user.fetch(`/api/files/${body.file.id}`, { method: 'DELETE' })).status).toBe(204);
      const response = await fetch(mint.body.url);
      expect(response.status).toBe(404);
      expect(await response.json()).toMatchObject({ error: 'FILE_NOT_FOUND' });
    });

    it('B stopped (SIGTERM twice, exit 0): A still serves its pages and API, and mints', async () => {
      b.child.kill('SIGTERM');
      expect(await b.stop()).toBe(0);
      const user = new SessionClient(appOrigin);
      const credentials = JSON.stringify({ username: 'carol', password: 'correct horse battery' });
      await user.fetch('/api/auth/register', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: credentials,
      });
      const form = new FormData();
      form.append('file', new Blob(['while B is away']), 'away.txt');
      const upload = await user.json<{ file: { id: string } }>('/api/files', { method: 'POST', body: form });
      expect(upload.status).toBe(201);
      expect((await user.fetch('/api/files')).status).toBe(200);
      expect(
        (await user.fetch(`/api/files/${upload.body.file.id}/download-token`, { method: 'POST' })).status,
      ).toBe(201);
      expect((await user.fetch('/', { headers: { accept: 'text/html' } })).status).toBe(200);
      expect((await fetch(`${appOrigin}/readyz`)).status).toBe(200);
    });

    it('A drains and exits 0 on SIGTERM, also when it arrives twice, leaving no temp files', async () => {
      a.child.kill('SIGTERM');
      expect(await a.stop()).toBe(0);
      if (stack.s3Prefix === undefined) expect(await readdir(join(dataDir, 'files', '.tmp'))).toEqual([]);
      else
        expect((await bucketContents(stack.s3Prefix)).filter((key) => key.startsWith('upload:'))).toEqual([]);
    });
  },
);
