import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join, relative } from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it, onTestFinished } from 'vitest';
import {
  type ByteRange,
  discard,
  isObjectId,
  LocalDiskStore,
  newObjectId,
  SMALL_READ_BYTES,
} from '../src/index.ts';
import { bytesStream, expectSameBytes, objectStoreContract, readAll } from './object-store.contract.ts';

/** A fresh temp directory, removed when the current test finishes. */
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'local-disk-store-'));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A store rooted in a fresh temp directory (the root itself does not exist yet). */
async function freshStore(): Promise<{ store: LocalDiskStore; root: string; base: string }> {
  const base = await tempDir();
  const root = join(base, 'store');
  const store = new LocalDiskStore(root);
  onTestFinished(() => store.close());
  return { store, root, base };
}

/** The object's bytes (or a range of them), read to the end. */
async function read(store: LocalDiskStore, id: string, range?: ByteRange): Promise<Buffer> {
  const file = await store.read(id, range);
  if (!file) throw Object.assign(new Error(`no object ${id}`), { code: 'ENOENT' });
  return readAll(file.body);
}

/** Size and mtime, the body left unread; `undefined` when there is no object. */
async function statOf(store: LocalDiskStore, id: string) {
  const file = await store.read(id);
  if (file) discard(file);
  return file && { size: file.size, mtime: file.mtime };
}

/** This process's open descriptors on files under `dir` (deleted ones end in " (deleted)"). */
async function descriptorsUnder(dir: string): Promise<string[]> {
  const targets = await Promise.all(
    (await readdir('/proc/self/fd')).map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')),
  );
  return targets.filter((target) => target.startsWith(`${dir}/`));
}

/** Every regular file under `dir` (recursively), as paths relative to `dir`; `[]` if `dir` is absent. */
async function walk(dir: string): Promise<string[]> {
  let entries: import('node:fs').Dirent[];
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw error;
  }
  const files: string[] = [];
  for (const entry of entries) {
    const full = join(dir, entry.name);
    if (entry.isDirectory()) {
      for (const sub of await walk(full)) files.push(join(entry.name, sub));
    } else {
      files.push(entry.name);
    }
  }
  return files.sort();
}

/** Paths and contents of every file under `dir`, to prove that nothing was touched. */
async function snapshot(dir: string): Promise<Map<string, string>> {
  const result = new Map<string, string>();
  for (const file of await walk(dir)) {
    result.set(file, (await readFile(join(dir, file))).toString('hex'));
  }
  return result;
}

describe('isObjectId', () => {
  it('accepts the nanoid shape and rejects everything else', () => {
    expect(isObjectId('V1StGXR8_Z5jdHi6B-myT')).toBe(true);
    expect(isObjectId('')).toBe(false);
    expect(isObjectId('V1StGXR8_Z5jdHi6B-my')).toBe(false); // 20
    expect(isObjectId('V1StGXR8_Z5jdHi6B-myTx')).toBe(false); // 22
    expect(isObjectId('../../etc/passwd')).toBe(false);
    expect(isObjectId('../../../../../victim')).toBe(false); // 21 chars, but not url-safe
    expect(isObjectId('V1StGXR8_Z5jdHi6B-my.')).toBe(false);
    expect(isObjectId('V1StGXR8_Z5jdHi6B-my\n')).toBe(false);
    expect(isObjectId('V1StGXR8_Z5jdHi6B-myT\n')).toBe(false);
  });
});

objectStoreContract('LocalDiskStore', async () => {
  const { store, root } = await freshStore();
  return { store, leftovers: () => walk(root) };
});

describe('LocalDiskStore.put', () => {
  it('writes files readable and writable by the owner only (0o600)', async () => {
    const { store, root } = await freshStore();
    const { id } = await store.put(bytesStream([Buffer.from('secret')]));
    const files = (await walk(root)).filter((file) => basename(file) === id);
    expect(files).toHaveLength(1);
    const info = await stat(join(root, files[0] ?? ''));
    expect(info.isFile()).toBe(true);
    expect(info.mode & 0o777).toBe(0o600);
  });
});

describe('LocalDiskStore.delete', () => {
  it('also removes the temporary file of an upload that a crash interrupted', async () => {
    const { store, root } = await freshStore();
    const id = newObjectId();
    // What a process killed mid-put leaves: the part written so far, never renamed.
    await mkdir(join(root, '.tmp'), { recursive: true });
    await writeFile(join(root, '.tmp', `${id}.part`), 'half an upload');
    expect(await walk(root)).toEqual([`.tmp/${id}.part`]);
    await store.delete(id);
    expect(await walk(root)).toEqual([]);
  });
});

describe('LocalDiskStore.open', () => {
  it('a range of at most SMALL_READ_BYTES is the bytes themselves, a larger one a stream', async () => {
    const { store, root } = await freshStore();
    const bytes = randomBytes(SMALL_READ_BYTES + 1);
    const { id } = await store.put(bytesStream([bytes]));
    const small = await store.read(id, { start: 1, end: SMALL_READ_BYTES });
    expect(Buffer.isBuffer(small?.body)).toBe(true);
    expectSameBytes(small?.body as Buffer, bytes.subarray(1));
    const empty = await store.put(bytesStream([]));
    expect((await store.read(empty.id))?.body).toEqual(Buffer.alloc(0));
    const whole = await store.read(id);
    expect(whole?.body).toBeInstanceOf(Readable);
    expectSameBytes(await readAll(whole?.body as Readable), bytes);
    // A small read holds the descriptor only while it reads: deleted, the file's space is freed.
    await store.delete(id);
    await store.delete(empty.id);
    expect(await store.read(id, { start: 0, end: 0 })).toBeUndefined();
    expect(await store.read(empty.id)).toBeUndefined();
    await expect.poll(() => descriptorsUnder(root)).toEqual([]);
  });

  it('concurrent streams of one object share its descriptor and each reads its own range', async () => {
    const { store, root } = await freshStore();
    const bytes = randomBytes(1_000_000);
    const { id } = await store.put(bytesStream([bytes]));
    const ranges = Array.from({ length: 20 }, (_, i) => ({ start: i * 37_000, end: i * 37_000 + 250_000 }));
    const reads = await Promise.all(ranges.map((range) => read(store, id, range)));
    reads.forEach((got, i) => {
      const { start, end } = ranges[i] as ByteRange;
      expectSameBytes(got, bytes.subarray(start, end + 1));
    });
    expect(await descriptorsUnder(root)).toHaveLength(1);
  });

  it('a stream destroyed midway (a client gone) leaves the shared descriptor open for the others', async () => {
    const { store, root } = await freshStore();
    const bytes = randomBytes(4_000_000);
    const { id } = await store.put(bytesStream([bytes]));
    const survivor = readAll((await store.read(id))?.body as Readable);
    for (let i = 0; i < 20; i++) {
      const aborted = (await store.read(id))?.body as Readable;
      await once(aborted, 'data');
      aborted.destroy();
      await once(aborted, 'close');
    }
    expectSameBytes(await survivor, bytes);
    expectSameBytes(await read(store, id), bytes);
    expect(await descriptorsUnder(root)).toHaveLength(1);
  });

  it('a stream made before the object was deleted finishes; after, the object is gone', async () => {
    const { store, root } = await freshStore();
    const bytes = randomBytes(2_000_000);
    const { id } = await store.put(bytesStream([bytes]));
    const stream = (await store.read(id))?.body;
    await store.delete(id);
    // The descriptor is still cached, but its file has no name any more.
    expect(await store.read(id)).toBeUndefined();
    expectSameBytes(await readAll(stream as Readable), bytes);
    // The last reader gone, the descriptor is closed and the disk space freed.
    await expect.poll(() => descriptorsUnder(root)).toEqual([]);
  });

  it('keeps at most 256 descriptors open, and none after close()', async () => {
    const { store, root } = await freshStore();
    const ids: string[] = [];
    for (let i = 0; i < 300; i++) ids.push((await store.put(bytesStream([Buffer.from(`object ${i}`)]))).id);
    for (const [i, id] of ids.entries()) expect((await read(store, id)).toString()).toBe(`object ${i}`);
    await expect.poll(async () => (await descriptorsUnder(root)).length).toBe(256);
    // The most recently read are the ones kept: reading them again opens nothing new.
    for (const id of ids.slice(-256)) await read(store, id);
    expect(await descriptorsUnder(root)).toHaveLength(256);
    await store.close();
    await expect.poll(() => descriptorsUnder(root)).toEqual([]);
  });
});

describe('LocalDiskStore.open and delete', () => {
  it('ignores malformed ids in open and delete without touching the file system', async () => {
    const { store, root, base } = await freshStore();
    const { id } = await store.put(bytesStream([Buffer.from('object')]));

    // Files a path-traversing or over-long id could reach if it were not rejected.
    await writeFile(join(base, 'victim'), 'outside the store');
    await mkdir(join(base, 'etc'), { recursive: true });
    await writeFile(join(base, 'etc', 'passwd'), 'root:x:0:0');
    const shard = id.slice(0, 2);
    const longId = `${id}x`;
    await writeFile(join(root, shard, longId), 'a 22-char name in the shard');
    await mkdir(join(root, 'a'), { recursive: true });
    await writeFile(join(root, 'a', 'b'), 'a/b');
    const before = await snapshot(base);

    const malformed = [
      '../../etc/passwd',
      '../etc/passwd',
      '',
      'a/b',
      longId,
      id.slice(1),
      '../../../../../victim',
      `../${relative(base, join(root, shard, longId))}`,
      `${id}\n`,
      '.tmp',
      '..',
      '.',
    ];
    for (const bad of malformed) {
      expect(await statOf(store, bad), bad).toBeUndefined();
      await expect(store.delete(bad), bad).resolves.toBeUndefined();
    }

    expect(await snapshot(base)).toEqual(before);
    expect((await statOf(store, id))?.size).toBe('object'.length);
  });
});
