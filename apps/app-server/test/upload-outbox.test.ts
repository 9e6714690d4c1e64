/**
 * An upload's object is in the delete outbox before its first byte is stored, due after the
 * upload's deadline, and its file row takes it off in the same transaction; a row that comes too
 * late (the sweep has claimed the object) is refused. A killed for real mid-upload:
 * test/e2e/upload-crash.test.ts.
 */
import { discard, newObjectId } from '@sfh/storage';
import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { count } from './test-utils.ts';

const db = useTestDatabase();

/** Seconds until the entry of `objectId` is due, or `undefined` when there is none. */
async function dueIn(app: FastifyInstance, objectId: string): Promise<number | undefined> {
  const { rows } = await app.db.query<{ seconds: number }>(
    'SELECT extract(epoch FROM next_attempt_at - now())::float8 AS seconds FROM object_deletions WHERE object_id = $1',
    [objectId],
  );
  return rows[0]?.seconds;
}

const fileOf = (userId: string, objectId: string) => ({
  id: newObjectId(),
  userId,
  objectId,
  name: 'f.bin',
  contentType: 'application/octet-stream',
  size: 1,
  sha256: '0'.repeat(64),
});

describe('the delete outbox and uploads', () => {
  it('an upload queues its object while it streams, due after UPLOAD_TIMEOUT_SECONDS; its row takes it off', async () => {
    const { app } = await buildTestApp(db(), { UPLOAD_TIMEOUT_SECONDS: '120' });
    const client = new TestClient(app);
    await client.register();
    // The entry as the upload's bytes reach the store: seen from inside the store's put.
    const seen: (number | undefined)[] = [];
    const put = app.storage.put.bind(app.storage);
    app.storage.put = async (source, id) => {
      seen.push(await dueIn(app, id as string));
      return put(source, id);
    };
    const response = await client.upload('f.bin', 'bytes');
    expect(response.statusCode).toBe(201);
    expect(seen).toHaveLength(1);
    // 120 s of upload time and a 600 s margin.
    expect(seen[0]).toBeGreaterThan(715);
    expect(seen[0]).toBeLessThanOrEqual(720);
    expect(await count(app, 'object_deletions')).toBe(0);
    // Everything due: the sweep finds nothing to delete, and the file is still there.
    await app.db.query('UPDATE object_deletions SET next_attempt_at = now()');
    expect(await app.objectDeletions.sweep()).toBe(0);
    const { rows } = await app.db.query<{ objectId: string }>('SELECT object_id AS "objectId" FROM files');
    const stored = await app.storage.read(rows[0]?.objectId as string);
    if (stored) discard(stored);
    expect(stored?.size).toBe(5);
  });

  it('a refused upload takes its entry along with its bytes', async () => {
    const { app } = await buildTestApp(db(), { MAX_UPLOAD_BYTES: '10' });
    const client = new TestClient(app);
    const user = await client.register();
    expect((await client.upload('big.bin', 'more than ten bytes')).statusCode).toBe(413);
    expect(await count(app, 'object_deletions')).toBe(0);
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);
  });

  it('the row is refused once a sweep has claimed the object; over the quota the entry stays', async () => {
    const { app } = await buildTestApp(db());
    const user = await new TestClient(app).register();
    const late = newObjectId();
    await app.repos.objectDeletions.queue(late, 3600);
    await app.db.query('UPDATE object_deletions SET next_attempt_at = now() WHERE object_id = $1', [late]);
    expect(await app.repos.objectDeletions.claimDue(10, 30)).toEqual([late]);
    await expect(app.repos.files.createWithinQuota(fileOf(user.id, late), 0, null)).rejects.toMatchObject({
      code: 'STORAGE_UNAVAILABLE',
    });
    // No entry at all (the sweep has deleted the object and its entry): refused as well.
    await app.repos.objectDeletions.done(late);
    await expect(app.repos.files.createWithinQuota(fileOf(user.id, late), 0, null)).rejects.toMatchObject({
      code: 'STORAGE_UNAVAILABLE',
    });
    expect(await count(app, 'files WHERE user_id = $1', [user.id])).toBe(0);

    const over = newObjectId();
    await app.repos.objectDeletions.queue(over, 3600);
    expect(
      await app.repos.files.createWithinQuota({ ...fileOf(user.id, over), size: 2 }, 1, null),
    ).toBeUndefined();
    expect(await dueIn(app, over)).toBeGreaterThan(3500);
    // A failed delete brings it forward: due now, not in an hour.
    await app.repos.objectDeletions.queue(over);
    expect(await dueIn(app, over)).toBeLessThanOrEqual(0);
  });
});
