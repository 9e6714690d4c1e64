import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, read, type Stats, type WriteStream } from 'node:fs';
import { type FileHandle, mkdir, open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { finished, type Readable } from 'node:stream';
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

/**
 * Bytes being read: the object's whole size and modification time, and the requested range (or
 * all of it): a stream, or, for a range of at most `SMALL_READ_BYTES` on local disk, the bytes
 * themselves. Whoever gets a stream reads it to the end or destroys it (`discard`).
 */
export interface ObjectRead {
  size: number;
  mtime: Date;
  body: Readable | Buffer;
}

/**
 * Ranges up to this size are read from local disk in one read and handed over as a Buffer: a
 * small file then costs one read and one write to the socket, without a read stream, a pipe and
 * their listeners (about a tenth of a small download's CPU time besides the token). It holds no
 * more memory than a stream's first read of the same range would.
 */
export const SMALL_READ_BYTES = 64 * 1024;

/** Gives up a read whose body will not be sent: a stream is destroyed (its descriptor freed). */
export function discard(read: ObjectRead): void {
  if (!Buffer.isBuffer(read.body)) read.body.destroy();
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
   * Streams `source` into a new object `id` (from `newObjectId()`; a fresh one if omitted) and
   * resolves once the bytes are durable. A caller that must survive its own crash records `id`
   * before calling (A's delete outbox). If `source` errors (an aborted upload, a size limit) or the
   * store fails, it rejects and leaves nothing behind: no object, no temporary file; where the
   * store could not clean up (a bucket gone mid-upload, a crash), `delete(id)` removes what is left.
   */
  put(source: Readable, id?: string): Promise<StoredObject>;
  /**
   * One request to the store: the object's `range` (or all of it) as a stream, with its size and
   * mtime; `undefined` if there is no such object, the id is malformed, or the range does not lie
   * within the object. Rejects with `StorageUnavailableError` when the store cannot answer in time.
   */
  read(id: string, range?: ByteRange): Promise<ObjectRead | undefined>;
  /**
   * Removes the object, and whatever a `put` of that id that failed or never finished left (a
   * temporary file, an incomplete multipart upload). Idempotent: deleting a missing object
   * succeeds. Rejects (and may be retried) when the store cannot say it is gone.
   */
  delete(id: string): Promise<void>;
  /** Resolves if the store answers now; rejects with `StorageUnavailableError` otherwise (readiness). */
  check(): Promise<void>;
  /** Releases what it holds open: descriptors, connections (call once no stream is left). */
  close(): Promise<void>;
}

/**
 * The store did not answer, or not in time (S3 down, slow, refusing our credentials): the caller
 * answers 503 and nothing was changed that it would have to undo.
 */
export class StorageUnavailableError extends Error {
  override name = 'StorageUnavailableError';
}

/** A descriptor the store keeps open, and how many readers hold it. */
interface OpenFile {
  handle: Promise<FileHandle>;
  users: number;
  idleSince: number;
  /** Out of the cache: closed as soon as no reader holds it. */
  evicted: boolean;
}

/**
 * How long an unused descriptor stays open, and how many the cache keeps (unused ones beyond that
 * are closed at once, least recently used first, well within the default limit of 1024 files).
 */
const OPEN_FILE_IDLE_MS = 10_000;
const MAX_OPEN_FILES = 256;

/**
 * For a read stream on a cached descriptor: it reads as usual but never closes the descriptor
 * (a destroyed stream otherwise does, whatever `autoClose` says). The store closes it.
 */
const SHARED_DESCRIPTOR = { read, close: (_fd: number, done: (error: null) => void) => done(null) };

// Ids are what `nanoid()` makes. Checking the shape keeps a path such as `../../etc/passwd` (which a
// verified token can never carry, but a bug elsewhere might) from ever reaching the file system.
const OBJECT_ID = /^[A-Za-z0-9_-]{21}$/;

/** Tells whether `id` has the shape of an object id. */
export const isObjectId = (id: string): boolean => OBJECT_ID.test(id);

/** A fresh object id: 126 random bits, never derived from anything a user sent. */
export const newObjectId = (): string => nanoid();

/**
 * Local-disk object store: `<root>/<2-char shard>/<id>`, temporary files in `<root>/.tmp` (same
 * file system, so the final rename is atomic).
 */
export class LocalDiskStore implements ObjectStore {
  readonly #root: string;
  readonly #tmp: string;
  /**
   * Descriptors of recently read objects, as nginx's `open_file_cache` keeps them: reading a file
   * read a moment ago costs one `fstat` (for the size, and a link count of 0 once it is deleted)
   * and its reads, not also an `open` and a `close`. Objects never change, so an open descriptor
   * always reads the bytes its id stands for.
   */
  readonly #openFiles = new Map<string, OpenFile>();
  #sweeper: NodeJS.Timeout | undefined;

  constructor(root: string) {
    this.#root = root;
    this.#tmp = join(root, '.tmp');
  }

  #path(id: string): string {
    if (!isObjectId(id)) throw new Error('Malformed object id');
    return join(this.#root, id.slice(0, 2), id);
  }

  #tmpPath(id: string): string {
    return join(this.#tmp, `${id}.part`);
  }

  async put(source: Readable, id = newObjectId()): Promise<StoredObject> {
    const finalPath = this.#path(id);
    const tmpPath = this.#tmpPath(id);
    // Until `pipeline` listens, an early error from the source (a client that disconnects at
    // once) would be an unhandled 'error' event and crash the process; pipeline still sees it.
    const ignore = () => {};
    source.on('error', ignore);
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

  async read(id: string, range?: ByteRange): Promise<ObjectRead | undefined> {
    if (!isObjectId(id)) return undefined;
    const file = this.#openFiles.get(id) ?? this.#cache(id);
    // Most recently used last: the least recently used unused descriptors go first.
    this.#openFiles.delete(id);
    this.#openFiles.set(id, file);
    // Held from here; the stream, once made, gives it back when it ends (below).
    file.users++;
    let handle: FileHandle;
    let info: Stats;
    try {
      handle = await file.handle;
      info = await handle.stat();
      // Deleted since it was opened: as if it was never there.
      if (info.nlink === 0) throw Object.assign(new Error('Object deleted'), { code: 'ENOENT' });
    } catch (error) {
      this.#evict(id, file);
      this.#release(file);
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
    const { start, end } = range ?? { start: 0, end: Math.max(0, info.size - 1) };
    if (range && (start > end || end >= info.size)) {
      this.#release(file);
      return undefined;
    }
    if (end - start + 1 <= SMALL_READ_BYTES) {
      try {
        const body = await readAt(handle.fd, start, range ? end - start + 1 : info.size);
        return { size: info.size, mtime: info.mtime, body };
      } finally {
        this.#release(file);
      }
    }
    // Reads of up to 256 KiB: large files stream at disk speed with few syscalls, and memory stays
    // bounded because the HTTP response applies backpressure. A buffer no larger than the range
    // spares small files a 256 KiB allocation. Reads are positional (`start`), so streams share
    // the descriptor.
    const body = createReadStream('', {
      fd: handle.fd,
      fs: SHARED_DESCRIPTOR,
      start,
      end,
      highWaterMark: Math.min(256 * 1024, end - start + 1),
    });
    // Read to the end, failed or destroyed (a client gone): the descriptor is free again.
    finished(body, () => this.#release(file));
    return { size: info.size, mtime: info.mtime, body };
  }

  #cache(id: string): OpenFile {
    const file: OpenFile = { handle: open(this.#path(id), 'r'), users: 0, idleSince: 0, evicted: false };
    // Settled here too, so that a failed open is never an unhandled rejection.
    file.handle.catch(() => {});
    this.#openFiles.set(id, file);
    for (const [otherId, other] of this.#openFiles) {
      if (this.#openFiles.size <= MAX_OPEN_FILES) break;
      if (other.users === 0 && other !== file) this.#evict(otherId, other);
    }
    this.#sweeper ??= setInterval(() => this.#sweep(), OPEN_FILE_IDLE_MS).unref();
    return file;
  }

  #release(file: OpenFile): void {
    file.users--;
    file.idleSince = Date.now();
    if (file.evicted && file.users === 0) closeQuietly(file);
  }

  #evict(id: string, file: OpenFile): void {
    if (this.#openFiles.get(id) === file) this.#openFiles.delete(id);
    file.evicted = true;
    if (file.users === 0) closeQuietly(file);
  }

  // Closes the descriptors unused for OPEN_FILE_IDLE_MS (a deleted file's space is freed then).
  #sweep(): void {
    const idleBefore = Date.now() - OPEN_FILE_IDLE_MS;
    for (const [id, file] of this.#openFiles) {
      if (file.users === 0 && file.idleSince < idleBefore) this.#evict(id, file);
    }
    if (this.#openFiles.size === 0) {
      clearInterval(this.#sweeper);
      this.#sweeper = undefined;
    }
  }

  async delete(id: string): Promise<void> {
    if (!isObjectId(id)) return;
    await rm(this.#path(id), { force: true });
    // What a crash mid-upload left.
    await rm(this.#tmpPath(id), { force: true });
  }

  async check(): Promise<void> {
    try {
      await mkdir(this.#root, { recursive: true });
    } catch (error) {
      throw new StorageUnavailableError(`Storage directory ${this.#root} is not usable`, { cause: error });
    }
  }

  async close(): Promise<void> {
    clearInterval(this.#sweeper);
    this.#sweeper = undefined;
    for (const [id, file] of this.#openFiles) this.#evict(id, file);
  }
}

/**
 * `length` bytes at `position`, in one positional read (a loop only if the kernel returns fewer).
 * Objects never change, so fewer bytes than asked means the file is not what it was: an error.
 */
function readAt(fd: number, position: number, length: number): Promise<Buffer> {
  const bytes = Buffer.allocUnsafe(length);
  return new Promise((resolve, reject) => {
    const next = (offset: number) => {
      if (offset === length) return resolve(bytes);
      read(fd, bytes, offset, length - offset, position + offset, (error, got) => {
        if (error) reject(error);
        else if (got === 0) reject(new Error('Object is shorter than its size'));
        else next(offset + got);
      });
    };
    next(0);
  });
}

function closeQuietly(file: OpenFile): void {
  file.handle.then((handle) => handle.close()).catch(() => {});
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
