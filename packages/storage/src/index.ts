import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, type WriteStream } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { nanoid } from 'nanoid';

/** What `put` learned about the bytes while it wrote them. */
export interface StoredObject {
  /** Server-generated id; never derived from anything a user sent. */
  id: string;
  size: number;
  /** Lowercase hex SHA-256 of the content. */
  sha256: string;
}

export interface ObjectInfo {
  size: number;
  mtime: Date;
}

/** Inclusive byte range, as in HTTP. */
export interface ByteRange {
  start: number;
  end: number;
}

/**
 * Immutable blobs addressed by a random id. Objects are written once and never modified, so
 * a reader never sees a partial write and an id always means the same bytes.
 */
export interface ObjectStore {
  /**
   * Streams `source` into a new object and resolves once the bytes are durable. If `source`
   * errors (an aborted upload, a size limit) or the disk fails, it rejects and leaves nothing
   * behind: no object, no temporary file.
   */
  put(source: Readable): Promise<StoredObject>;
  /** Size and modification time, or `undefined` if there is no such object (or the id is malformed). */
  stat(id: string): Promise<ObjectInfo | undefined>;
  /**
   * The object's bytes, or the inclusive `range` of them (faster when the caller knows the size).
   * Errors on the stream if the object is gone.
   */
  createReadStream(id: string, range?: ByteRange): Readable;
  /** Removes the object. Idempotent: deleting a missing object succeeds. */
  delete(id: string): Promise<void>;
}

// Ids are what `nanoid()` makes. Checking the shape keeps a path such as `../../etc/passwd` (which a
// verified token can never carry, but a bug elsewhere might) from ever reaching the file system.
const OBJECT_ID = /^[A-Za-z0-9_-]{21}$/;

/** Tells whether `id` has the shape of an object id. */
export const isObjectId = (id: string): boolean => OBJECT_ID.test(id);

/**
 * Local-disk object store: `<root>/<2-char shard>/<id>`, temporary files in `<root>/.tmp` (same
 * file system, so the final rename is atomic).
 */
export class LocalDiskStore implements ObjectStore {
  readonly #root: string;
  readonly #tmp: string;

  constructor(root: string) {
    this.#root = root;
    this.#tmp = join(root, '.tmp');
  }

  #path(id: string): string {
    if (!isObjectId(id)) throw new Error('Malformed object id');
    return join(this.#root, id.slice(0, 2), id);
  }

  async put(source: Readable): Promise<StoredObject> {
    // Until `pipeline` listens, an early error from the source (a client that disconnects at
    // once) would be an unhandled 'error' event and crash the process; pipeline still sees it.
    const ignore = () => {};
    source.on('error', ignore);
    const id = nanoid();
    const finalPath = this.#path(id);
    const tmpPath = join(this.#tmp, `${id}.part`);
    const hash = createHash('sha256');
    let size = 0;
    let out: WriteStream | undefined;
    try {
      await mkdir(this.#tmp, { recursive: true });
      // `flush`: fsync before close, so the bytes are on disk before the rename publishes them.
      out = createWriteStream(tmpPath, { flags: 'wx', mode: 0o600, flush: true });
      await pipeline(
        source,
        async function* measure(chunks: AsyncIterable<Buffer>) {
          for await (const chunk of chunks) {
            hash.update(chunk);
            size += Buffer.byteLength(chunk);
            yield chunk;
          }
        },
        out,
      );
      await mkdir(join(this.#root, id.slice(0, 2)), { recursive: true });
      await rename(tmpPath, finalPath);
      await syncDir(join(this.#root, id.slice(0, 2)));
    } catch (error) {
      // The file may still be opening when the source fails; removing it before it exists
      // would leave it behind.
      if (out && !out.closed) await new Promise<void>((resolve) => out?.once('close', resolve));
      await rm(tmpPath, { force: true });
      throw error;
    } finally {
      source.off('error', ignore);
    }
    return { id, size, sha256: hash.digest('hex') };
  }

  async stat(id: string): Promise<ObjectInfo | undefined> {
    if (!isObjectId(id)) return undefined;
    try {
      const info = await stat(this.#path(id));
      return { size: info.size, mtime: info.mtime };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
  }

  createReadStream(id: string, range?: ByteRange): Readable {
    // Reads of up to 256 KiB: large files stream at disk speed with few syscalls, and memory stays
    // bounded because the HTTP response applies backpressure. A buffer no larger than the range,
    // and a known end, spare small files a 256 KiB allocation and a read that only finds the end.
    const length = range ? range.end - range.start + 1 : Number.POSITIVE_INFINITY;
    const highWaterMark = Math.min(256 * 1024, Math.max(1, length));
    return createReadStream(this.#path(id), { ...range, highWaterMark });
  }

  async delete(id: string): Promise<void> {
    if (!isObjectId(id)) return;
    await rm(this.#path(id), { force: true });
  }
}

// A rename is durable only once its directory entry is; without this a crash can lose a file
// whose upload already succeeded.
async function syncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
