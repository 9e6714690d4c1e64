/**
 * A killed (SIGKILL) in the middle of an upload leaves no object that no row knows: the upload's
 * object id is in the delete outbox before its first byte is stored, and once the entry is due the
 * sweep of the next A deletes what the dead one left. Real processes on the real Postgres (a lock
 * held on the user's row from outside stops A exactly between a complete object and its row), on
 * local disk and on the real bucket (infra/s3-local.sh).
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { describe, expect, it, onTestFinished } from 'vitest';
import { createTestDatabase } from '../support/database.ts';
import { SignedInClient } from '../support/http-client.ts';
import { APP_SERVER, freePort, startServer } from '../support/processes.ts';
import { bucketContents, freshPrefix, S3_SKIP, s3Env } from '../support/s3.ts';
import { skipUnless } from '../support/skip.ts';
import { CHEAP_PASSWORDS } from '../support/stack.ts';

const MIB = 1024 * 1024;

// Holding a row lock from a second connection needs a real Postgres: PGlite has one backend.
const noPostgres = skipUnless(
  'A killed mid-upload',
  !process.env.TEST_DATABASE_URL && 'needs TEST_DATABASE_URL (a real Postgres) to hold a lock beside A',
);

const storages = ['local', ...(S3_SKIP ? [] : ['s3'])] as const;

/** A on a database and a store of its own; the store's contents (objects, temporary files, parts). */
async function setUp(storage: (typeof storages)[number]) {
  const db = await createTestDatabase();
  const dataDir = await mkdtemp(join(tmpdir(), 'sfh-crash-'));
  onTestFinished(async () => {
    await db.close();
    await rm(dataDir, { recursive: true, force: true });
  });
  const prefix = freshPrefix();
  const port = await freePort();
  const origin = `http://127.0.0.1:${port}`;
  const env = {
    DATA_DIR: dataDir,
    DATABASE_URL: db.url,
    APP_PORT: String(port),
    APP_PUBLIC_URL: origin,
    OBJECT_DELETE_RETRY_SECONDS: '1',
    ...CHEAP_PASSWORDS,
    ...(storage === 's3' && s3Env(prefix, 'writer')),
  };
  const startA = async () => {
    const a = await startServer(APP_SERVER, env, `${origin}/readyz`);
    onTestFinished(async () => {
      await a.stop('SIGKILL');
    });
    return a;
  };
  const contents = async () =>
    storage === 's3'
      ? bucketContents(prefix)
      : (await readdir(join(dataDir, 'files'), { recursive: true, withFileTypes: true }))
          .filter((entry) => entry.isFile())
          .map((entry) => join(entry.parentPath, entry.name));
  const sql = new pg.Client({ connectionString: db.url });
  await sql.connect();
  onTestFinished(() => sql.end());
  return { origin, startA, contents, sql };
}

/** An upload whose body the test sends piece by piece over a chunked request. */
function streamedUpload(client: SignedInClient) {
  const boundary = `----sfh-crash-${randomBytes(8).toString('hex')}`;
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const body = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
  });
  const answer = client
    .fetch('/api/files', {
      method: 'POST',
      body,
      duplex: 'half',
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
    } as RequestInit)
    .then((response) => response.status)
    .catch(() => 'connection lost' as const);
  controller.enqueue(
    Buffer.from(
      `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n` +
        'Content-Type: application/octet-stream\r\n\r\n',
    ),
  );
  return {
    answer,
    send: (bytes: number) => controller.enqueue(randomBytes(bytes)),
    end: () => {
      controller.enqueue(Buffer.from(`\r\n--${boundary}--\r\n`));
      controller.close();
    },
  };
}

describe.skipIf(noPostgres.skip).each(storages)(
  `A killed mid-upload (%s storage)${noPostgres.reason}`,
  (storage) => {
    it('between a complete object and its row, and while the bytes stream: the next A sweeps both away', async () => {
      const { origin, startA, contents, sql } = await setUp(storage);
      const a = await startA();
      const client = await SignedInClient.signUp(origin, 'crash', 'correct horse battery');
      const { rows } = await sql.query<{ id: string }>("SELECT id FROM users WHERE username = 'crash'");
      const userId = rows[0]?.id;
      const queued = async () => (await sql.query('SELECT object_id FROM object_deletions')).rows.length;

      // 1. An upload that has stored part of its bytes (S3: a multipart upload has begun).
      const partial = streamedUpload(client);
      partial.send(12 * MIB);
      await expect.poll(queued, { timeout: 10_000 }).toBe(1);
      await expect
        .poll(async () => (await contents()).filter((key) => /upload:|\.tmp/.test(key)), { timeout: 10_000 })
        .toHaveLength(1);

      // 2. An upload whose object is complete and its row not yet written: A waits for the
      //    user's row, which the test locks once the upload has reserved its quota.
      const complete = streamedUpload(client);
      complete.send(MIB);
      await expect.poll(queued, { timeout: 10_000 }).toBe(2);
      await sql.query('BEGIN');
      await sql.query('SELECT 1 FROM users WHERE id = $1 FOR UPDATE', [userId]);
      complete.end();
      const finished = (keys: string[]) => keys.filter((key) => !/upload:|\.tmp/.test(key));
      await expect.poll(async () => finished(await contents()), { timeout: 10_000 }).toHaveLength(1);
      // A is blocked on the lock, in the insert of the row.
      await expect
        .poll(
          async () =>
            (await sql.query("SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")).rows
              .length,
        )
        .toBe(1);

      await a.stop('SIGKILL');
      await sql.query('ROLLBACK');
      expect(await complete.answer).toBe('connection lost');
      expect(await partial.answer).toBe('connection lost');
      expect((await sql.query('SELECT 1 FROM files')).rows).toEqual([]);
      expect(await contents()).toHaveLength(2);

      // The next A: its sweep leaves the entries alone until they are due (after
      // UPLOAD_TIMEOUT_SECONDS and a margin, here brought forward), then deletes both.
      await startA();
      await new Promise((resolve) => setTimeout(resolve, 2_000));
      expect(await contents()).toHaveLength(2);
      await sql.query('UPDATE object_deletions SET next_attempt_at = now()');
      // Both gone, and then their entries (each once its object is).
      await expect.poll(async () => [await contents(), await queued()], { timeout: 15_000 }).toEqual([[], 0]);

      // A normal upload's object is never swept: its row took its entry off.
      const form = new FormData();
      form.append('file', new Blob([randomBytes(1000)]), 'kept.bin');
      expect((await client.fetch('/api/files', { method: 'POST', body: form })).status).toBe(201);
      expect(await queued()).toBe(0);
      await sql.query('UPDATE object_deletions SET next_attempt_at = now()');
      await new Promise((resolve) => setTimeout(resolve, 2_000));
      expect(await contents()).toHaveLength(1);
    });
  },
);
