import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  ListMultipartUploadsCommand,
  S3Client,
  type S3ClientConfig,
  S3ServiceException,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import {
  type ByteRange,
  isObjectId,
  newObjectId,
  type ObjectRead,
  type ObjectStore,
  StorageUnavailableError,
  type StoredObject,
} from './index.ts';

/** Where the objects live; connection and credentials come from the AWS SDK's own environment and chain. */
export interface S3StoreOptions {
  bucket: string;
  /** Prepended to every object id (`files/` puts them in a folder). */
  prefix: string;
  /** Path-style URLs (`endpoint/bucket/key`), which MinIO, Ceph and Swift need. */
  forcePathStyle: boolean;
  /**
   * Longest any one call may take to connect, and to get its answer's head (the body of a
   * download then streams as fast as its reader takes it). A stalled store fails instead of hanging.
   */
  timeoutMs: number;
  /** Uploads above this are multipart, in parts of this size (at least 5 MiB, S3's minimum). */
  partSize?: number;
  /** Anything else for the client (tests pass other credentials). */
  client?: S3ClientConfig;
}

const DEFAULT_PART_SIZE = 8 * 1024 * 1024;

/** What `check()` reads: 15 characters, so never an object id (21), and normally missing. */
const PROBE_KEY = 'readiness-probe';
/** Answers to it that say the store is there and knows our credentials. */
const PROBE_ANSWERS = new Set(['NoSuchKey', 'AccessDenied']);

/**
 * Objects in an S3 bucket, as `<prefix><id>`. An upload is one PUT when it fits in a part and a
 * multipart upload otherwise, hashed as it streams; a failed one is aborted, so it leaves neither
 * an object nor parts (a crash, or a bucket gone mid-upload, can still leave parts: `delete(id)`
 * aborts them, and so does the bucket's lifecycle rule).
 */
export class S3Store implements ObjectStore {
  readonly #client: S3Client;
  readonly #bucket: string;
  readonly #prefix: string;
  readonly #partSize: number;

  constructor(options: S3StoreOptions) {
    this.#bucket = options.bucket;
    this.#prefix = options.prefix;
    this.#partSize = options.partSize ?? DEFAULT_PART_SIZE;
    this.#client = new S3Client({
      forcePathStyle: options.forcePathStyle,
      // Checksums only where S3 requires them: S3-compatible stores (Swift, older Ceph) refuse the
      // newer SDKs' default aws-chunked trailing checksums. Integrity is our own SHA-256.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      // A retry, not three: a store that is down should be a quick 503, not a long wait.
      maxAttempts: 2,
      requestHandler: {
        connectionTimeout: options.timeoutMs,
        requestTimeout: options.timeoutMs,
        // Without this a request past its timeout only logs a warning, and waits on.
        throwOnRequestTimeout: true,
      },
      ...options.client,
    });
  }

  #key(id: string): string {
    return `${this.#prefix}${id}`;
  }

  async put(source: Readable, id = newObjectId()): Promise<StoredObject> {
    if (!isObjectId(id)) throw new Error('Malformed object id');
    // The source's own error (a client gone, a size limit) is what the caller must see; not the
    // abort that stopping to read it causes once the upload itself has failed.
    let sourceError: unknown;
    let stoppedReading = false;
    const remember = (error: unknown) => {
      if (!stoppedReading) sourceError ??= error;
    };
    source.on('error', remember);
    const hash = createHash('sha256');
    let size = 0;
    const body = Readable.from(
      (async function* measure() {
        let read = false;
        try {
          for await (const chunk of source) {
            const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : (chunk as Buffer);
            hash.update(bytes);
            size += bytes.length;
            yield bytes;
          }
          read = true;
        } finally {
          stoppedReading = !read;
        }
      })(),
    );
    const upload = new Upload({
      client: this.#client,
      params: { Bucket: this.#bucket, Key: this.#key(id), Body: body },
      partSize: this.#partSize,
      queueSize: 2,
    });
    try {
      await upload.done();
    } catch (error) {
      // lib-storage has aborted the multipart upload (if there was one) before rejecting.
      // If the store failed, that abort may have failed too: the caller can delete `id` later.
      body.destroy();
      throw sourceError ?? unavailable('upload', error);
    } finally {
      source.off('error', remember);
    }
    if (sourceError) {
      await this.delete(id).catch(() => {});
      throw sourceError;
    }
    return { id, size, sha256: hash.digest('hex') };
  }

  async read(id: string, range?: ByteRange): Promise<ObjectRead | undefined> {
    if (!isObjectId(id)) return undefined;
    if (range && range.start > range.end) return undefined;
    try {
      const answer = await this.#client.send(
        new GetObjectCommand({
          Bucket: this.#bucket,
          Key: this.#key(id),
          ...(range && { Range: `bytes=${range.start}-${range.end}` }),
        }),
      );
      const body = answer.Body as Readable;
      const total = range ? Number(/\/(\d+)$/.exec(answer.ContentRange ?? '')?.[1]) : answer.ContentLength;
      // A range clamped by the store is not the range asked for.
      const length = range ? range.end - range.start + 1 : total;
      if (total === undefined || !Number.isSafeInteger(total) || answer.ContentLength !== length) {
        body.destroy();
        return undefined;
      }
      return { size: total, mtime: answer.LastModified ?? new Date(0), body };
    } catch (error) {
      const status = statusOf(error);
      if (status === 404 || status === 416) return undefined;
      throw unavailable('read', error);
    }
  }

  /** Deletes the object and aborts any incomplete multipart upload of it (a failed put's parts). */
  async delete(id: string): Promise<void> {
    if (!isObjectId(id)) return;
    const Key = this.#key(id);
    try {
      // One by one: DeleteObjects needs a Content-MD5 header that current SDKs no longer send,
      // and that some S3-compatible stores insist on.
      await this.#client.send(new DeleteObjectCommand({ Bucket: this.#bucket, Key }));
      const { Uploads = [] } = await this.#client.send(
        new ListMultipartUploadsCommand({ Bucket: this.#bucket, Prefix: Key }),
      );
      for (const upload of Uploads.filter((u) => u.Key === Key)) {
        await this.#client.send(
          new AbortMultipartUploadCommand({ Bucket: this.#bucket, Key, UploadId: upload.UploadId }),
        );
      }
    } catch (error) {
      if (statusOf(error) === 404) return;
      throw unavailable('delete', error);
    }
  }

  /**
   * Resolves if the bucket answers and takes our credentials (readiness probes). One GetObject of
   * a key that is never an object: B may only read objects, so HeadBucket (which needs
   * `s3:ListBucket`) may be refused to it. "No such key" (404) and "access denied" (403, what S3
   * answers for a missing key to whoever may not list the bucket) come after the store has checked
   * the signature: ready. Unreachable, too slow, an unknown access key or a wrong secret
   * (`InvalidAccessKeyId`, `SignatureDoesNotMatch`), no such bucket: rejects.
   */
  async check(): Promise<void> {
    try {
      const answer = await this.#client.send(
        new GetObjectCommand({ Bucket: this.#bucket, Key: this.#key(PROBE_KEY) }),
      );
      (answer.Body as Readable).destroy();
    } catch (error) {
      if (error instanceof S3ServiceException && PROBE_ANSWERS.has(error.name)) return;
      throw unavailable('check', error);
    }
  }

  async close(): Promise<void> {
    this.#client.destroy();
  }
}

/** The HTTP status the store answered with, if it answered at all. */
function statusOf(error: unknown): number | undefined {
  return error instanceof S3ServiceException ? error.$metadata.httpStatusCode : undefined;
}

function unavailable(what: string, error: unknown): StorageUnavailableError {
  const detail = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return new StorageUnavailableError(`Object store ${what} failed: ${detail}`, { cause: error });
}
