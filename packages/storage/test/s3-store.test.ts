/**
 * S3Store: the object-store contract against a real S3 server (infra/s3-local.sh, Swift's s3api),
 * then what only S3 can get wrong: multipart uploads and their abort, read-only credentials, a
 * store that is down or stalls (a real listening socket that never answers).
 */
import { randomBytes } from 'node:crypto';
import { createServer, type Socket } from 'node:net';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { freePort } from '../../../test/support/processes.ts';
import {
  bucketContents,
  openS3Store,
  requireS3,
  S3_PORT,
  S3_SKIP,
  s3StoreOptions,
} from '../../../test/support/s3.ts';
import { startTcpGate } from '../../../test/support/tcp-gate.ts';
import { newObjectId, StorageUnavailableError } from '../src/index.ts';
import { S3Store } from '../src/s3.ts';
import {
  bytesStream,
  expectSameBytes,
  objectStoreContract,
  readBytes,
  sha256,
} from './object-store.contract.ts';

const MiB = 1024 * 1024;

describe.skipIf(S3_SKIP)('S3Store against infra/s3-local.sh', () => {
  beforeAll(requireS3);

  objectStoreContract(
    'S3Store',
    async () => {
      const { store, prefix } = openS3Store();
      return { store, leftovers: () => bucketContents(prefix) };
    },
    { puts: 30 },
  );

  it('streams a large upload as a multipart upload and reads it back whole and in ranges', async () => {
    const { store, prefix } = openS3Store('writer', { partSize: 5 * MiB });
    const bytes = randomBytes(12 * MiB + 7);
    const chunks = Array.from({ length: Math.ceil(bytes.length / 65_536) }, (_, i) =>
      bytes.subarray(i * 65_536, (i + 1) * 65_536),
    );
    const stored = await store.put(bytesStream(chunks));
    expect(stored).toMatchObject({ size: bytes.length, sha256: sha256(bytes) });
    expect(await bucketContents(prefix)).toEqual([stored.id]);
    expectSameBytes(await readBytes(store, stored.id), bytes);
    const range = { start: 5 * MiB - 3, end: 10 * MiB + 3 };
    expectSameBytes(await readBytes(store, stored.id, range), bytes.subarray(range.start, range.end + 1));
  });

  it('a multipart upload that fails after two parts leaves no object and no incomplete upload', async () => {
    const { store, prefix } = openS3Store('writer', { partSize: 5 * MiB });
    const error = new Error('client went away');
    let sent = 0;
    const source = new Readable({
      read() {
        if (sent >= 11 * MiB) {
          this.destroy(error);
          return;
        }
        sent += MiB;
        this.push(randomBytes(MiB));
      },
    });
    await expect(store.put(source)).rejects.toBe(error);
    expect(await bucketContents(prefix)).toEqual([]);
  });

  it('the bucket gone mid-upload: StorageUnavailableError; delete(id) later removes its parts', async () => {
    const gate = await startTcpGate(S3_PORT);
    onTestFinished(() => gate.close());
    const { store, prefix } = openS3Store('writer', {
      partSize: 5 * MiB,
      timeoutMs: 500,
      client: { ...s3StoreOptions('').client, endpoint: `http://127.0.0.1:${gate.port}` },
    });
    let sent = 0;
    const source = new Readable({
      read() {
        sent += MiB;
        if (sent !== 11 * MiB) {
          this.push(sent > 20 * MiB ? null : randomBytes(MiB));
          return;
        }
        // Once the multipart upload exists, the bucket goes away, with more parts to come.
        void (async () => {
          while (!(await bucketContents(prefix)).some((key) => key.startsWith('upload:'))) await sleep(20);
          gate.set('down');
          this.push(randomBytes(MiB));
        })();
      },
    });
    const objectId = newObjectId();
    await expect(store.put(source, objectId)).rejects.toBeInstanceOf(StorageUnavailableError);
    // The abort could not reach the bucket: the upload's parts are still there...
    expect(await bucketContents(prefix)).toEqual([`upload:${objectId}`]);
    gate.set('open');
    // ...until the caller deletes the object once the bucket is back.
    await store.delete(objectId);
    expect(await bucketContents(prefix)).toEqual([]);
  });

  it('with read-only credentials reads, but cannot write or delete', async () => {
    const { store: writer, prefix } = openS3Store('writer');
    const { store: reader } = openS3Store('reader', {}, prefix);
    const { id } = await writer.put(bytesStream([Buffer.from('readable')]));
    expect((await readBytes(reader, id)).toString()).toBe('readable');
    await expect(reader.put(bytesStream([Buffer.from('no')]))).rejects.toBeInstanceOf(
      StorageUnavailableError,
    );
    await expect(reader.delete(id)).rejects.toBeInstanceOf(StorageUnavailableError);
    expect(await bucketContents(prefix)).toEqual([id]);
  });
});

describe('S3Store when the store is down or stalls', () => {
  it('a closed port: every call rejects with StorageUnavailableError, quickly', async () => {
    const port = await freePort();
    const store = new S3Store(
      s3StoreOptions('p/', 'writer', {
        client: {
          endpoint: `http://127.0.0.1:${port}`,
          region: 'us-east-1',
          credentials: { accessKeyId: 'a', secretAccessKey: 'b' },
        },
      }),
    );
    onTestFinished(() => store.close());
    const started = performance.now();
    await expect(store.put(bytesStream([Buffer.from('x')]))).rejects.toBeInstanceOf(StorageUnavailableError);
    await expect(store.read('V1StGXR8_Z5jdHi6B-myT')).rejects.toBeInstanceOf(StorageUnavailableError);
    await expect(store.delete('V1StGXR8_Z5jdHi6B-myT')).rejects.toBeInstanceOf(StorageUnavailableError);
    await expect(store.check()).rejects.toBeInstanceOf(StorageUnavailableError);
    expect(performance.now() - started).toBeLessThan(5_000);
  });

  it('a store that accepts connections and never answers: rejects after the timeout, never hangs', async () => {
    const sockets = new Set<Socket>();
    const server = createServer((socket) => {
      sockets.add(socket);
      socket.resume();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    onTestFinished(() => {
      for (const socket of sockets) socket.destroy();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    });
    const { port } = server.address() as { port: number };
    const store = new S3Store(
      s3StoreOptions('p/', 'writer', {
        timeoutMs: 300,
        client: {
          endpoint: `http://127.0.0.1:${port}`,
          region: 'us-east-1',
          credentials: { accessKeyId: 'a', secretAccessKey: 'b' },
        },
      }),
    );
    onTestFinished(() => store.close());
    for (const call of [
      () => store.read('V1StGXR8_Z5jdHi6B-myT'),
      () => store.put(bytesStream([Buffer.from('x')])),
      () => store.delete('V1StGXR8_Z5jdHi6B-myT'),
    ]) {
      const started = performance.now();
      await expect(call()).rejects.toBeInstanceOf(StorageUnavailableError);
      // Two attempts of 300 ms, and a backoff between them.
      expect(performance.now() - started).toBeLessThan(3_000);
    }
  });
});
