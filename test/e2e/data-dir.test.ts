import { chmod, cp, lstat, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, inject, it, onTestFinished } from 'vitest';
import { walkFiles } from '../../apps/app-server/test/test-utils.ts';
import { SignedInClient } from '../support/http-client.ts';
import { APP_SERVER, DOWNLOAD_SERVER, freePort, startServer } from '../support/processes.ts';
import { CHEAP_PASSWORDS } from '../support/stack.ts';

/** Every folder and file below `dir` (itself included) whose mode lets anyone else in. */
async function notPrivate(dir: string): Promise<string[]> {
  const paths = ['.', ...(await walkFiles(dir))];
  const folders = new Set<string>(['.']);
  for (const path of paths) {
    let parent = join(path, '..');
    while (parent !== '.' && parent !== '..') {
      folders.add(parent);
      parent = join(parent, '..');
    }
  }
  const loose: string[] = [];
  for (const path of new Set([...paths, ...folders])) {
    const mode = (await lstat(join(dir, path))).mode & 0o777;
    if ((mode & 0o077) !== 0) loose.push(`${path} ${mode.toString(8)}`);
  }
  return loose.sort();
}

/**
 * A on `dataDir`, B on it too or on a `DATA_DIR` of its own (reading A's files); a sign-up, an
 * upload and a download through them.
 */
async function signUpUploadDownload(dataDir: string, downloadDataDir = dataDir) {
  const [appPort, downloadPort] = [await freePort(), await freePort()];
  const appOrigin = `http://127.0.0.1:${appPort}`;
  const downloadOrigin = `http://127.0.0.1:${downloadPort}`;
  const shared = { DATA_DIR: dataDir, APP_PUBLIC_URL: appOrigin, DOWNLOAD_PUBLIC_URL: downloadOrigin };
  const a = await startServer(
    APP_SERVER,
    { ...shared, ...CHEAP_PASSWORDS, APP_PORT: String(appPort) },
    `${appOrigin}/readyz`,
  );
  onTestFinished(() => a.stop().then(() => undefined));
  const b = await startServer(
    DOWNLOAD_SERVER,
    {
      ...shared,
      DATA_DIR: downloadDataDir,
      STORAGE_DIR: join(dataDir, 'files'),
      DOWNLOAD_PORT: String(downloadPort),
    },
    `${downloadOrigin}/readyz`,
  );
  onTestFinished(() => b.stop().then(() => undefined));

  const user = await SignedInClient.signUp(appOrigin, 'modes', 'correct horse battery');
  const form = new FormData();
  form.append('file', new Blob(['private bytes']), 'private.txt');
  const upload = await user.json<{ file: { id: string } }>('/api/files', { method: 'POST', body: form });
  expect(upload.status).toBe(201);
  const mint = await user.json<{ url: string }>(`/api/files/${upload.body.file.id}/download-token`, {
    method: 'POST',
  });
  expect((await fetch(mint.body.url)).status).toBe(200);
  return { a, b };
}

// A DATA_DIR written by an earlier version (world-readable folders and files, as PGlite and a
// default umask leave them): after A and B have started on it and served a download, nothing
// below it is readable by another local user, old files and new ones alike.
it('makes DATA_DIR private (0700 folders, 0600 files), also one left by an earlier version', async () => {
  const dataDir = await mkdtemp(join(tmpdir(), 'sfh-modes-'));
  onTestFinished(() => rm(dataDir, { recursive: true, force: true }));
  await cp(inject('pgliteTemplate'), join(dataDir, 'pg'), { recursive: true });
  await mkdir(join(dataDir, 'files'), { mode: 0o755 });
  await writeFile(join(dataDir, 'session-secret'), 'an-old-development-secret-of-32-chars', { mode: 0o644 });
  await chmod(dataDir, 0o755);
  await chmod(join(dataDir, 'session-secret'), 0o644);
  await chmod(join(dataDir, 'pg'), 0o755);
  expect((await notPrivate(dataDir)).length).toBeGreaterThan(3);

  const { a } = await signUpUploadDownload(dataDir);
  expect(await notPrivate(dataDir)).toEqual([]);
  // Without a key-encryption key the signing key sits in the database in plain: A says so.
  expect(a.output()).toMatch(
    /KEY_ENCRYPTION_KEY is not set: the private signing keys are stored UNENCRYPTED/,
  );
}, 90_000);

// A fresh DATA_DIR of A's own (B elsewhere, so B's start-up pass cannot tidy up after A):
// PGlite's initdb writes about a thousand files and Postgres rewrites pg_internal.init after
// A's start-up pass made the folder private. Emscripten chmods what it creates, whatever the
// umask: each of them must still be 0600.
it('keeps every file PGlite creates private, from initdb on', async () => {
  const dataDir = await mkdtemp(join(tmpdir(), 'sfh-modes-fresh-'));
  const downloadDataDir = await mkdtemp(join(tmpdir(), 'sfh-modes-fresh-b-'));
  onTestFinished(() => rm(dataDir, { recursive: true, force: true }));
  onTestFinished(() => rm(downloadDataDir, { recursive: true, force: true }));
  const { a, b } = await signUpUploadDownload(dataDir, downloadDataDir);
  expect(await notPrivate(dataDir)).toEqual([]);
  // And what the shutdown checkpoint writes.
  expect(await a.stop()).toBe(0);
  expect(await b.stop()).toBe(0);
  const files = await walkFiles(join(dataDir, 'pg'));
  expect(files.length).toBeGreaterThan(900);
  expect(files.filter((file) => file.endsWith('pg_internal.init')).length).toBeGreaterThan(0);
  expect(await notPrivate(dataDir)).toEqual([]);
}, 90_000);
