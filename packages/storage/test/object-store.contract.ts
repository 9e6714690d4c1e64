import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { type ByteRange, discard, isObjectId, newObjectId, type ObjectStore } from '../src/index.ts';

/** A store for one test (closed and cleaned up when the test finishes), and what it holds. */
export interface ContractStore {
  store: ObjectStore;
  /** Everything the store keeps (objects, temporary files, incomplete uploads), sorted. */
  leftovers(): Promise<string[]>;
}

const ID_SHAPE = /^[A-Za-z0-9_-]{21}$/;

export const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

/** A byte-mode stream of `chunks`, pushed one per read. */
export function bytesStream(chunks: Buffer[]): Readable {
  let i = 0;
  return new Readable({
    read() {
      this.push(i < chunks.length ? chunks[i++] : null);
    },
  });
}

/** A body's bytes: a stream read to the end, or the bytes a small read handed over at once. */
export async function readAll(stream: Readable | Buffer): Promise<Buffer> {
  if (Buffer.isBuffer(stream)) return stream;
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

/** Byte equality without vitest's element-by-element deep diff (far too slow for megabytes). */
export function expectSameBytes(actual: Buffer, expected: Buffer): void {
  expect(actual.length).toBe(expected.length);
  expect(actual.equals(expected), 'bytes differ').toBe(true);
}

/** The object's bytes (or a range of them) through `read`. */
export async function readBytes(store: ObjectStore, id: string, range?: ByteRange): Promise<Buffer> {
  const found = await store.read(id, range);
  if (!found) throw Object.assign(new Error(`no object ${id}`), { code: 'ENOENT' });
  return readAll(found.body);
}

async function sizeOf(store: ObjectStore, id: string): Promise<number | undefined> {
  const found = await store.read(id);
  if (found) discard(found);
  return found?.size;
}

async function putAndCheck(store: ObjectStore, chunks: Buffer[]): Promise<string> {
  const bytes = Buffer.concat(chunks);
  const stored = await store.put(bytesStream(chunks));
  expect(stored.id).toMatch(ID_SHAPE);
  expect(stored.size).toBe(bytes.length);
  expect(stored.sha256).toBe(sha256(bytes));
  const found = await store.read(stored.id);
  expect(found?.size).toBe(bytes.length);
  expect(found?.mtime).toBeInstanceOf(Date);
  expectSameBytes(await readAll(found?.body as Readable | Buffer), bytes);
  return stored.id;
}

/** A source that sends a few chunks and then fails with `error` (an aborted upload, a limit). */
function failingSource(error: Error, chunks = 3, chunkSize = 64 * 1024): Readable {
  let pushes = 0;
  return new Readable({
    read() {
      if (pushes++ < chunks) this.push(randomBytes(chunkSize));
      else this.destroy(error);
    },
  });
}

/** What every `ObjectStore` guarantees (the TSDoc of the interface), run against one implementation. */
export function objectStoreContract(
  name: string,
  setup: () => Promise<ContractStore>,
  options = { puts: 200 },
) {
  describe(`${name}: put`, () => {
    it('stores a few bytes', async () => {
      const { store } = await setup();
      await putAndCheck(store, [Buffer.from('hello, world\n')]);
    });

    it('stores an empty stream', async () => {
      const { store } = await setup();
      const id = await putAndCheck(store, []);
      expect(await sizeOf(store, id)).toBe(0);
    });

    it('stores ~5 MiB streamed in many uneven chunks', async () => {
      const { store } = await setup();
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
      const { store } = await setup();
      const text = 'héllo, wörld — 你好 🎉';
      const bytes = Buffer.from(text, 'utf8');
      expect(bytes.length).not.toBe(text.length);
      const stored = await store.put(Readable.from([text]));
      expectSameBytes(await readBytes(store, stored.id), bytes);
      expect(stored.sha256).toBe(sha256(bytes));
      expect(stored.size).toBe(bytes.length);
      expect(await sizeOf(store, stored.id)).toBe(bytes.length);
    });

    it(`makes 21-char url-safe ids, distinct across ${options.puts} puts and not derived from the input`, async () => {
      const { store } = await setup();
      const ids = new Set<string>();
      const idLike = 'AAAAAAAAAAAAAAAAAAAAA';
      const contentHex = sha256(Buffer.from(idLike));
      for (let i = 0; i < options.puts; i++) {
        const source = bytesStream([Buffer.from(idLike)]);
        // A source carrying a path-like property (as fs.ReadStream does) must not leak into the id.
        Object.assign(source, { path: '../../etc/passwd', filename: 'evil.txt' });
        const { id } = await store.put(source);
        expect(isObjectId(id)).toBe(true);
        expect(id).not.toContain('AAAA');
        expect(id).not.toContain('passwd');
        expect(id).not.toContain('evil');
        expect(contentHex).not.toContain(id.toLowerCase());
        ids.add(id);
      }
      expect(ids.size).toBe(options.puts);
    });

    it('stores under the id the caller chose beforehand, and refuses a malformed one', async () => {
      const { store, leftovers } = await setup();
      const id = newObjectId();
      expect(isObjectId(id)).toBe(true);
      expect((await store.put(bytesStream([Buffer.from('chosen')]), id)).id).toBe(id);
      expect((await readBytes(store, id)).toString()).toBe('chosen');
      for (const bad of ['../../etc/passwd', '', 'a/b', `${id}x`]) {
        await expect(store.put(bytesStream([Buffer.from('no')]), bad), bad).rejects.toThrow(/Malformed/);
      }
      expect(await leftovers()).toHaveLength(1);
    });

    it('rejects with the source error and leaves nothing behind', async () => {
      const { store, leftovers } = await setup();
      const keptId = await putAndCheck(store, [Buffer.from('already here')]);
      const before = await leftovers();
      expect(before).toHaveLength(1);
      const error = new Error('upload aborted');
      await expect(store.put(failingSource(error))).rejects.toBe(error);
      expect(await leftovers()).toEqual(before);
      expect(await sizeOf(store, keptId)).toBe('already here'.length);
    });

    it('leaves nothing when a put fails late, at once, or right after put() is called', async () => {
      const { store, leftovers } = await setup();
      const lateError = new Error('late failure');
      let sent = false;
      const late = new Readable({
        read() {
          if (sent) setTimeout(() => this.destroy(lateError), 5);
          else {
            sent = true;
            this.push(Buffer.from('partial data'));
          }
        },
      });
      await expect(store.put(late)).rejects.toBe(lateError);

      const immediateError = new Error('no data at all');
      const immediate = new Readable({
        read() {
          this.destroy(immediateError);
        },
      });
      await expect(store.put(immediate)).rejects.toBe(immediateError);

      // An 'error' event emitted while nobody listens crashes the process: record such an emit.
      const earlyError = new Error('client went away');
      const early = new Readable({ read() {} });
      const unhandled: unknown[] = [];
      const emit = early.emit.bind(early);
      early.emit = ((event: string | symbol, ...args: unknown[]) => {
        if (event === 'error' && early.listenerCount('error') === 0) {
          unhandled.push(args[0]);
          return false;
        }
        return emit(event, ...args);
      }) as Readable['emit'];
      const put = store.put(early);
      early.destroy(earlyError);
      await expect(put).rejects.toBe(earlyError);
      expect(unhandled).toEqual([]);

      expect(await leftovers()).toEqual([]);
    });

    it('handles 20 concurrent puts', async () => {
      const { store } = await setup();
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
          expectSameBytes(await readBytes(store, result.id), bytes);
        }),
      );
    });
  });

  describe(`${name}: read and delete`, () => {
    it('reads inclusive byte ranges, with the size of the whole object', async () => {
      const { store } = await setup();
      const bytes = randomBytes(300_000);
      const { id } = await store.put(bytesStream([bytes]));
      const last = bytes.length - 1;
      for (const range of [
        { start: 0, end: 0 },
        { start: 1000, end: 270_000 },
        { start: last, end: last },
        { start: 0, end: last },
      ]) {
        const found = await store.read(id, range);
        expect(found?.size).toBe(bytes.length);
        expectSameBytes(
          await readAll(found?.body as Readable | Buffer),
          bytes.subarray(range.start, range.end + 1),
        );
      }
    });

    it('answers undefined for a range outside the object, a missing id and a malformed one', async () => {
      const { store } = await setup();
      const { id } = await store.put(bytesStream([Buffer.from('0123456789')]));
      expect(await store.read(id, { start: 10, end: 10 })).toBeUndefined();
      expect(await store.read(id, { start: 5, end: 10 })).toBeUndefined();
      expect(await store.read('V1StGXR8_Z5jdHi6B-myT')).toBeUndefined();
      for (const bad of ['../../etc/passwd', '', 'a/b', `${id}x`, `${id}\n`, '.tmp', '..']) {
        expect(await store.read(bad), bad).toBeUndefined();
        await expect(store.delete(bad), bad).resolves.toBeUndefined();
      }
      expect((await readBytes(store, id)).toString()).toBe('0123456789');
    });

    it('a body destroyed midway (a client gone) does not disturb other reads', async () => {
      const { store } = await setup();
      const bytes = randomBytes(4_000_000);
      const { id } = await store.put(bytesStream([bytes]));
      for (let i = 0; i < 5; i++) {
        const found = await store.read(id);
        const body = found?.body as Readable;
        await new Promise((resolve) => body.once('data', resolve));
        body.destroy();
      }
      expectSameBytes(await readBytes(store, id), bytes);
    });

    it('deletes an object, idempotently, and keeps the others', async () => {
      const { store, leftovers } = await setup();
      const keep = await putAndCheck(store, [Buffer.from('keep me')]);
      const gone = await putAndCheck(store, [Buffer.from('delete me')]);
      await store.delete(gone);
      expect(await store.read(gone)).toBeUndefined();
      await expect(store.delete(gone)).resolves.toBeUndefined();
      await expect(store.delete('V1StGXR8_Z5jdHi6B-myT')).resolves.toBeUndefined();
      expect((await leftovers()).join('\n')).toContain(keep);
      expect((await leftovers()).join('\n')).not.toContain(gone);
      expect((await readBytes(store, keep)).toString()).toBe('keep me');
    });

    it('check() resolves while the store is there', async () => {
      const { store } = await setup();
      await expect(store.check()).resolves.toBeUndefined();
    });
  });
}
