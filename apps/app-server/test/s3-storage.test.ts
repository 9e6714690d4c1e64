/**
 * A on S3 (infra/s3-local.sh): uploads stream into the bucket, a single PUT or multipart, and a
 * refused one leaves nothing; the bucket down or stalled is 503 STORAGE_UNAVAILABLE on uploads and
 * on /readyz; deleting a file deletes its object, and a delete the bucket missed is retried by
 * the sweep. The bucket is taken away for real, by a TCP gate in front of it. Credentials reach
 * the SDK as in a deployment: through its own AWS_* environment variables.
 */
import { createHash, randomBytes } from 'node:crypto';
import { GetObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { beforeAll, describe, expect, it, onTestFinished, vi } from 'vitest';
import {
  bucketContents,
  freshPrefix,
  requireS3,
  S3_BUCKET,
  S3_PORT,
  S3_SKIP,
  s3Env,
} from '../../../test/support/s3.ts';
import { startTcpGate } from '../../../test/support/tcp-gate.ts';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count, expectError } from './test-utils.ts';

const db = useTestDatabase();
const MiB = 1024 * 1024;
const sha256 = (bytes: Buffer) => createHash('sha256').update(bytes).digest('hex');

/** A on the bucket under a fresh prefix, reached through a gate; a signed-in client. */
async function appOnS3(env: Record<string, string> = {}) {
  const gate = await startTcpGate(S3_PORT);
  onTestFinished(() => gate.close());
  const prefix = freshPrefix();
  const settings: Record<string, string> = {
    ...s3Env(prefix, 'writer', `http://127.0.0.1:${gate.port}`),
    S3_TIMEOUT_MS: '500',
  };
  for (const name of ['AWS_ENDPOINT_URL_S3', 'AWS_REGION', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'])
    vi.stubEnv(name, settings[name] as string);
  const { app } = await buildTestApp(db(), { ...settings, ...env });
  const client = new TestClient(app);
  const user = await client.register();
  return { app, client, user, gate, prefix };
}

async function objectBytes(key: string): Promise<Buffer> {
  const s3 = new S3Client({
    endpoint: `http://127.0.0.1:${S3_PORT}`,
    region: process.env.AWS_REGION,
    forcePathStyle: true,
  });
  try {
    const answer = await s3.send(new GetObjectCommand({ Bucket: S3_BUCKET, Key: key }));
    return Buffer.from(
      await (answer.Body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray(),
    );
  } finally {
    s3.destroy();
  }
}

describe.skipIf(S3_SKIP)('A with S3_BUCKET', () => {
  beforeAll(requireS3);

  it('streams a small file (one PUT) and a 12 MiB one (multipart) into the bucket, row only once complete', async () => {
    const { app, client, user, prefix } = await appOnS3();
    for (const bytes of [randomBytes(1000), randomBytes(12 * MiB + 5)]) {
      const response = await client.upload('f.bin', bytes);
      expect(response.statusCode).toBe(201);
      expect(response.json().file).toMatchObject({ size: bytes.length, sha256: sha256(bytes) });
      const objectId = (
        await app.db.query('SELECT object_id FROM files WHERE id = $1', [response.json().file.id])
      ).rows[0].object_id as string;
      expect((await objectBytes(`${prefix}${objectId}`)).equals(bytes)).toBe(true);
    }
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(2);
    expect(await bucketContents(prefix)).toHaveLength(2);
  });

  it('refuses a file over MAX_UPLOAD_BYTES mid-stream (after a part went up): 413, no object, no parts', async () => {
    const { app, client, user, prefix } = await appOnS3({ MAX_UPLOAD_BYTES: String(10 * MiB) });
    expectError(await client.upload('big.bin', randomBytes(12 * MiB)), 413, 'FILE_TOO_LARGE');
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
    expect(await bucketContents(prefix)).toEqual([]);
  });

  it('bucket down: upload 503 STORAGE_UNAVAILABLE at once, /readyz says so; back up: both work', async () => {
    const { app, client, user, gate, prefix } = await appOnS3();
    gate.set('down');
    const started = performance.now();
    const refused = await client.upload('f.bin', randomBytes(1000));
    expectError(refused, 503, 'STORAGE_UNAVAILABLE');
    expect(refused.headers['retry-after']).toBe('5');
    expectError(await app.inject({ url: '/readyz' }), 503, 'STORAGE_UNAVAILABLE');
    expect(performance.now() - started).toBeLessThan(5_000);
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);

    gate.set('open');
    expect((await app.inject({ url: '/readyz' })).statusCode).toBe(200);
    expect((await client.upload('f.bin', randomBytes(1000))).statusCode).toBe(201);
    expect(await bucketContents(prefix)).toHaveLength(1);
  });

  it('bucket stalled: upload 503 STORAGE_UNAVAILABLE after the timeout, never a hang', async () => {
    const { client, gate } = await appOnS3();
    gate.set('stall');
    const started = performance.now();
    expectError(await client.upload('f.bin', randomBytes(1000)), 503, 'STORAGE_UNAVAILABLE');
    // S3_TIMEOUT_MS=500, two attempts.
    expect(performance.now() - started).toBeLessThan(5_000);
  });

  it('deleting a file deletes its object; with the bucket down the row goes, the object is swept later', async () => {
    const { app, client, user, gate, prefix } = await appOnS3();
    const first = (await client.upload('a.bin', 'first')).json().file.id as string;
    const second = (await client.upload('b.bin', 'second')).json().file.id as string;
    expect(await bucketContents(prefix)).toHaveLength(2);
    const objectOf = async (fileId: string) =>
      (await app.db.query('SELECT object_id FROM files WHERE id = $1', [fileId])).rows[0].object_id as string;
    const [firstObject, secondObject] = [await objectOf(first), await objectOf(second)];
    const queued = (objectId: string) => count(app, 'object_deletions WHERE object_id = $1', [objectId]);

    expect((await client.request({ method: 'DELETE', url: `/api/files/${first}` })).statusCode).toBe(204);
    expect(await bucketContents(prefix)).toHaveLength(1);
    expect(await queued(firstObject)).toBe(0);

    gate.set('down');
    expect((await client.request({ method: 'DELETE', url: `/api/files/${second}` })).statusCode).toBe(204);
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
    expect(await bucketContents(prefix)).toHaveLength(1);
    expect(await queued(secondObject)).toBe(1);
    // Due at once (no attempt by the sweep yet): the sweep fails while the bucket is down...
    expect(await app.objectDeletions.sweep()).toBe(0);
    expect(await queued(secondObject)).toBe(1);

    // ...and succeeds once it is back and the entry is due again.
    gate.set('open');
    await app.db.query('UPDATE object_deletions SET next_attempt_at = now()');
    expect(await app.objectDeletions.sweep()).toBeGreaterThanOrEqual(1);
    expect(await queued(secondObject)).toBe(0);
    expect(await bucketContents(prefix)).toEqual([]);
  });
});
