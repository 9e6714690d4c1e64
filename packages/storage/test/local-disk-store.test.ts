import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join, relative } from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it, onTestFinished } from 'vitest';
import { type ByteRange, isObjectId, LocalDiskStore, type ObjectStore } from '../src/index.ts';

const ID_SHAPE = /^[A-Za-z0-9_-]{21}$/;

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

/** The object's bytes (or a range of them), read through `open` and released. */
async function read(store: ObjectStore, id: string, range?: ByteRange): Promise<Buffer> {
  const file = await store.open(id);
  if (!file) throw Object.assign(new Error(`no object ${id}`), { code: 'ENOENT' });
  try {
    return await readAll(file.createReadStream(range));
  } finally {
    file.release();
  }
}

/** Size and mtime through `open`, released at once; `undefined` when there is no object. */
async function statOf(store: ObjectStore, id: string) {
  const file = await store.open(id);
  file?.release();
  return file && { size: file.size, mtime: file.mtime };
}

/** This process's open descriptors on files under `dir` (deleted ones end in " (deleted)"). */
async function descriptorsUnder(dir: string): Promise<string[]> {
  const targets = await Promise.all(
    (await readdir('/proc/self/fd')).map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')),
  );
  return targets.filter((target) => target.startsWith(`${dir}/`));
}

const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

/** A byte-mode stream of `chunks`, pushed one per read. */
function bytesStream(chunks: Buffer[]): Readable {
  let i = 0;
  return new Readable({
    read() {
      this.push(i < chunks.length ? chunks[i++] : null);
    },
  });
}

async function readAll(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
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

/** Byte equality without vitest's element-by-element deep diff (far too slow for megabytes). */
function expectSameBytes(actual: Buffer, expected: Buffer): void {
  expect(actual.length).toBe(expected.length);
  expect(actual.equals(expected), 'bytes differ').toBe(true);
}

async function putAndCheck(store: ObjectStore, chunks: Buffer[]): Promise<string> {
  const bytes = Buffer.concat(chunks);
  const stored = await store.put(bytesStream(chunks));
  expect(stored.id).toMatch(ID_SHAPE);
  expect(stored.size).toBe(bytes.length);
  expect(stored.sha256).toBe(sha256(bytes));
  expect(stored.sha256).toMatch(/^[0-9a-f]{64}$/);
  expectSameBytes(await read(store, stored.id), bytes);
  const info = await statOf(store, stored.id);
  expect(info?.size).toBe(bytes.length);
  expect(info?.mtime).toBeInstanceOf(Date);
  return stored.id;
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

describe('LocalDiskStore.put', () => {
  it('stores a few bytes', async () => {
    const { store } = await freshStore();
    await putAndCheck(store, [Buffer.from('hello, world\n')]);
  });

  it('stores an empty stream', async () => {
    const { store } = await freshStore();
    const id = await putAndCheck(store, []);
    const stored = await statOf(store, id);
    expect(stored?.size).toBe(0);
  });

  it('stores ~5 MiB streamed in many uneven chunks', async () => {
    const { store } = await freshStore();
    const total = 5 * 1024 * 1024 + 12_345;
    const chunks: Buffer[] = [];
    for (let done = 0, i = 0; done < total; i++) {
      const length = Math.min(total - done, 1 + ((i * 7919) % 65_537));
      chunks.push(randomBytes(length));
      done += length;
    }
    expect(chunks.length).toBeGreaterThan(100);
    await putAndCheck(store, chunks);
  });

  it('reports the size in bytes, not characters, when the source yields strings', async () => {
    const { store } = await freshStore();
    const text = 'héllo, wörld — 你好 🎉';
    const bytes = Buffer.from(text, 'utf8');
    expect(bytes.length).not.toBe(text.length);
    const stored = await store.put(Readable.from([text]));
    expectSameBytes(await read(store, stored.id), bytes);
    expect(stored.sha256).toBe(sha256(bytes));
    expect((await statOf(store, stored.id))?.size).toBe(bytes.length);
    expect(stored.size).toBe(bytes.length);
  });

  it('makes 21-char url-safe ids, distinct across 200 puts and not derived from the input', async () => {
    const { store } = await freshStore();
    const ids = new Set<string>();
    // Content that itself looks like an id, put repeatedly: the id must not be the content
    // (or its hash), and equal content must not yield equal ids.
    const idLike = 'AAAAAAAAAAAAAAAAAAAAA';
    const contentHex = sha256(Buffer.from(idLike));
    for (let i = 0; i < 200; i++) {
      const source = bytesStream([Buffer.from(idLike)]);
      // A source carrying a path-like property (as fs.ReadStream does) must not leak into the id.
      Object.assign(source, { path: '../../etc/passwd', filename: 'evil.txt' });
      const { id } = await store.put(source);
      expect(id).toMatch(ID_SHAPE);
      expect(isObjectId(id)).toBe(true);
      expect(id).not.toContain('AAAA');
      expect(id).not.toContain('passwd');
      expect(id).not.toContain('evil');
      expect(contentHex).not.toContain(id.toLowerCase());
      ids.add(id);
    }
    expect(ids.size).toBe(200);
  });

  it('rejects with the source error and leaves nothing behind', async () => {
    const { store, root } = await freshStore();
    const keptId = await putAndCheck(store, [Buffer.from('already here')]);
    const before = await walk(root);
    expect(before).toHaveLength(1);

    const error = new Error('upload aborted');
    let pushes = 0;
    const source = new Readable({
      read() {
        if (pushes++ < 3) this.push(randomBytes(64 * 1024));
        else this.destroy(error);
      },
    });
    await expect(store.put(source)).rejects.toBe(error);

    expect(await walk(root)).toEqual(before);
    expect((await walk(join(root, '.tmp'))).filter((f) => f.endsWith('.part'))).toEqual([]);
    expect(await walk(join(root, '.tmp'))).toEqual([]);
    expect((await statOf(store, keptId))?.size).toBe('already here'.length);
  });

  it('leaves no files when the very first put fails, including asynchronous and immediate failures', async () => {
    const { store, root } = await freshStore();

    const asyncError = new Error('late failure');
    let sent = false;
    const late = new Readable({
      read() {
        if (!sent) {
          sent = true;
          this.push(Buffer.from('partial data'));
        } else {
          setTimeout(() => this.destroy(asyncError), 5);
        }
      },
    });
    await expect(store.put(late)).rejects.toBe(asyncError);

    const immediateError = new Error('no data at all');
    const immediate = new Readable({
      read() {
        this.destroy(immediateError);
      },
    });
    await expect(store.put(immediate)).rejects.toBe(immediateError);

    expect(await walk(root)).toEqual([]);
  });

  it('handles a source that errors right after put() is called, without an unhandled error event', async () => {
    const { store, root } = await freshStore();
    const error = new Error('client went away');
    const source = new Readable({ read() {} });
    // An 'error' event emitted while nobody listens crashes the process (uncaughtException). Record
    // such an emit instead of letting it take the test runner down.
    const unhandled: unknown[] = [];
    const emit = source.emit.bind(source);
    source.emit = ((event: string | symbol, ...args: unknown[]) => {
      if (event === 'error' && source.listenerCount('error') === 0) {
        unhandled.push(args[0]);
        return false;
      }
      return emit(event, ...args);
    }) as Readable['emit'];

    const put = store.put(source);
    source.destroy(error); // e.g. the client disconnects while put() is still preparing directories
    await expect(put).rejects.toBe(error);

    expect(unhandled).toEqual([]);
    expect(await walk(root)).toEqual([]);
  });

  it('handles 20 concurrent puts', async () => {
    const { store } = await freshStore();
    const payloads = Array.from({ length: 20 }, (_, i) =>
      Array.from({ length: 1 + (i % 5) }, () => randomBytes(1000 + i * 4099)),
    );
    const results = await Promise.all(payloads.map((chunks) => store.put(bytesStream(chunks))));
    expect(new Set(results.map((r) => r.id)).size).toBe(20);
    await Promise.all(
      results.map(async (result, i) => {
        const bytes = Buffer.concat(payloads[i] ?? []);
        expect(result.size).toBe(bytes.length);
        expect(result.sha256).toBe(sha256(bytes));
        expectSameBytes(await read(store, result.id), bytes);
        expect((await statOf(store, result.id))?.size).toBe(bytes.length);
      }),
    );
  });

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

describe('LocalDiskStore.open', () => {
  it('reads inclusive byte ranges', async () => {
    const { store } = await freshStore();
    const bytes = randomBytes(300_000);
    const { id } = await store.put(bytesStream([bytes]));
    const last = bytes.length - 1;

    expectSameBytes(await read(store, id, { start: 0, end: 0 }), bytes.subarray(0, 1));
    expectSameBytes(await read(store, id, { start: 1000, end: 270_000 }), bytes.subarray(1000, 270_001));
    expectSameBytes(await read(store, id, { start: last, end: last }), bytes.subarray(last));
    expectSameBytes(await read(store, id, { start: 0, end: last }), bytes);
  });

  it('answers undefined for a well-formed id that does not exist', async () => {
    const { store } = await freshStore();
    await store.put(bytesStream([Buffer.from('x')]));
    expect(await store.open('V1StGXR8_Z5jdHi6B-myT')).toBeUndefined();
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
    const file = await store.open(id);
    const survivor = readAll(file?.createReadStream() as Readable);
    for (let i = 0; i < 20; i++) {
      const aborted = file?.createReadStream() as Readable;
      await once(aborted, 'data');
      aborted.destroy();
      await once(aborted, 'close');
    }
    file?.release();
    expectSameBytes(await survivor, bytes);
    expectSameBytes(await read(store, id), bytes);
    expect(await descriptorsUnder(root)).toHaveLength(1);
  });

  it('a stream made before the object was deleted finishes; after, the object is gone', async () => {
    const { store, root } = await freshStore();
    const bytes = randomBytes(2_000_000);
    const { id } = await store.put(bytesStream([bytes]));
    const file = await store.open(id);
    const stream = file?.createReadStream();
    file?.release();
    await store.delete(id);
    // The descriptor is still cached, but its file has no name any more.
    expect(await store.open(id)).toBeUndefined();
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
  it('deletes an object, idempotently', async () => {
    const { store, root } = await freshStore();
    const keep = await putAndCheck(store, [Buffer.from('keep me')]);
    const gone = await putAndCheck(store, [Buffer.from('delete me')]);

    await store.delete(gone);
    expect(await statOf(store, gone)).toBeUndefined();
    await expect(read(store, gone)).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(store.delete(gone)).resolves.toBeUndefined();

    expect((await walk(root)).map((file) => basename(file))).toEqual([keep]);
    expect(await read(store, keep)).toEqual(Buffer.from('keep me'));
  });

  it('returns undefined for a missing but well-formed id, and deleting it resolves', async () => {
    const { store } = await freshStore();
    expect(await statOf(store, 'V1StGXR8_Z5jdHi6B-myT')).toBeUndefined();
    await expect(store.delete('V1StGXR8_Z5jdHi6B-myT')).resolves.toBeUndefined();
    // Also before the store has ever written anything (the root does not exist yet).
    await store.put(bytesStream([Buffer.from('x')]));
    expect(await statOf(store, 'V1StGXR8_Z5jdHi6B-myT')).toBeUndefined();
  });

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
