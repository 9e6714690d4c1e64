import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { type FileClaims, signDownloadToken } from '@sfh/download-token';
import { LocalDiskStore } from '@sfh/storage';
import type { CryptoKey } from 'jose';
import { nanoid } from 'nanoid';
import { DOWNLOAD_SERVER, freePort, type ServerProcess, startServer } from './processes.ts';
import { signingKey } from './signing-key.ts';

// B alone, as a real process with no A behind it: keys from a JWKS file, files in a local store
// the test writes, tokens minted here exactly as A mints them.

/** The issuer of the tokens minted here; nothing listens there. */
const APP_PUBLIC_URL = 'http://a.test';

/** One B process with its own data dir, key, store, and a record of every token it was shown. */
export interface B {
  server: ServerProcess;
  origin: string;
  dir: string;
  store: LocalDiskStore;
  storageDir: string;
  /** The signing key's id, and the JWKS file B reads it from. */
  kid: string;
  jwksFile: string;
  /** Every token minted or sent to this B, so the log check covers them all. */
  tokens: string[];
  put(bytes: Buffer, name?: string): Promise<FileClaims>;
  mint(file: FileClaims, options?: { now?: Date; key?: CryptoKey }): Promise<string>;
  url(token: string): string;
  stop(): Promise<void>;
}

export async function startB(env: Record<string, string> = {}): Promise<B> {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-e2e-b-'));
  const storageDir = join(dir, 'objects');
  const { kid, privateKey, jwksFile } = await signingKey(dir);
  const port = await freePort();
  const origin = `http://127.0.0.1:${port}`;
  const server = await startServer(
    DOWNLOAD_SERVER,
    {
      DATA_DIR: join(dir, 'data'),
      STORAGE_DIR: storageDir,
      JWKS_FILE: jwksFile,
      APP_PUBLIC_URL,
      DOWNLOAD_PUBLIC_URL: origin,
      DOWNLOAD_PORT: String(port),
      LOG_LEVEL: 'info',
      ...env,
    },
    `${origin}/readyz`,
  );
  const store = new LocalDiskStore(storageDir);
  const tokens: string[] = [];
  return {
    server,
    origin,
    dir,
    store,
    storageDir,
    kid,
    jwksFile,
    tokens,
    async put(bytes, name = 'file.bin') {
      const stored = await store.put(Readable.from(bytes.length > 0 ? [bytes] : []));
      return {
        fid: nanoid(),
        obj: stored.id,
        name,
        ctype: 'application/octet-stream',
        size: stored.size,
        sha256: stored.sha256,
      };
    },
    async mint(file, options = {}) {
      const { token } = await signDownloadToken(file, {
        key: options.key ?? privateKey,
        kid,
        issuer: APP_PUBLIC_URL,
        audience: origin,
        subject: 'user-1',
        ttlSeconds: 60,
        ...(options.now ? { now: options.now } : {}),
      });
      tokens.push(token);
      return token;
    },
    url: (token) => `${origin}/d/${token}`,
    async stop() {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
