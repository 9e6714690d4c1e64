/**
 * Test fixtures for server B: a real app (real key file, real disk storage, real journal) in a
 * fresh temp directory, closed and removed when the test finishes (`onTestFinished`).
 * Tokens are minted with the real `signDownloadToken`, as A would.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { type FileClaims, signDownloadToken, TOKEN_TYPE, type TokenAlgorithm } from '@sfh/download-token';
import { LocalDiskStore } from '@sfh/storage';
import type { FastifyInstance } from 'fastify';
import { CompactSign, type CryptoKey, exportJWK, generateKeyPair, type JWK } from 'jose';
import { nanoid } from 'nanoid';
import { onTestFinished } from 'vitest';
import { buildApp } from '../src/app.ts';
import { type DownloadConfig, loadConfig } from '../src/config.ts';

export const ISSUER = 'http://a.test';
export const AUDIENCE = 'http://b.test';
export const SUBJECT = 'user-1';
export const TTL_SECONDS = 60;

/** A signing key as A holds it: private half, public JWK, key id, algorithm. */
export interface TestKey {
  kid: string;
  alg: TokenAlgorithm;
  privateKey: CryptoKey;
  publicJwk: JWK;
}

/**
 * A fresh key pair (EdDSA unless told: the attack table's tokens are crafted for Ed25519; A's
 * own ES256 keys are exercised by the e2e suites). Not published anywhere unless written to a
 * JWKS file.
 */
export async function createKey(kid = `k-${nanoid(8)}`, alg: TokenAlgorithm = 'EdDSA'): Promise<TestKey> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  return { kid, alg, privateKey, publicJwk: await exportJWK(publicKey) };
}

/** A key's entry in a JWKS, as A publishes it. */
export const jwkOf = (key: TestKey) => ({ ...key.publicJwk, kid: key.kid, alg: key.alg, use: 'sig' });

/** A key B has never seen (an attacker's), for forgery tests. `kid` may copy a real key's id. */
export const createUnknownKey = (kid?: string): Promise<TestKey> => createKey(kid);

/** A fresh temp directory, removed when the current test finishes. */
export async function tempDir(prefix = 'download-server-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Signs an arbitrary payload as a compact JWS (jose's `CompactSign` validates no claims), for
 * hostile tokens. The header defaults to a download token's (the key's alg and kid, `dl+jwt`).
 */
export async function signRaw(
  payload: Record<string, unknown>,
  key: TestKey,
  header: Record<string, unknown> = {},
): Promise<string> {
  return new CompactSign(new TextEncoder().encode(JSON.stringify(payload)))
    .setProtectedHeader({ alg: key.alg, kid: key.kid, typ: TOKEN_TYPE, ...header })
    .sign(key.privateKey);
}

export interface MintOptions {
  now?: Date;
  ttlSeconds?: number;
  kid?: string;
  key?: TestKey['privateKey'];
  issuer?: string;
  audience?: string;
  subject?: string;
}

export interface TestApp {
  app: FastifyInstance;
  config: DownloadConfig;
  dir: string;
  jwksFile: string;
  key: TestKey;
  /** The same object store B reads (`config.storageDir`). */
  storage: LocalDiskStore;
  /** Stores `bytes` and returns the file claims A would put in a token for them. */
  putFile(bytes: Buffer | string, options?: { name?: string; ctype?: string }): Promise<FileClaims>;
  /** A download token for `file`, signed with the published key unless told otherwise. */
  mint(file: FileClaims, options?: MintOptions): Promise<string>;
  /** Closes the app (idempotent; also runs when the test finishes). */
  close(): Promise<void>;
}

export interface BuildOptions {
  /** Reuse this data directory (a restart); it is not removed by this app's cleanup. */
  dir?: string;
  /** Sign with and publish this key instead of a fresh one. */
  key?: TestKey;
  /** Read keys from this URL instead of the JWKS file. */
  jwksUrl?: string;
}

/**
 * Builds B on a fresh temp `DATA_DIR` with a JWKS file holding one fresh key.
 * `overrides` are environment variables on top of the test defaults.
 */
export async function buildTestApp(
  overrides: Record<string, string> = {},
  options: BuildOptions = {},
): Promise<TestApp> {
  const dir = options.dir ?? (await tempDir());
  const key = options.key ?? (await createKey());
  const jwksFile = join(dir, 'jwks.json');
  const jwks = { keys: [jwkOf(key)] };
  // 0644 whatever the umask: B refuses a key file that group or others may write.
  await writeFile(jwksFile, JSON.stringify(jwks), { mode: 0o644 });

  const config = loadConfig({
    DATA_DIR: dir,
    ...(options.jwksUrl ? { JWKS_URL: options.jwksUrl } : { JWKS_FILE: jwksFile }),
    LOG_LEVEL: 'silent',
    APP_PUBLIC_URL: ISSUER,
    DOWNLOAD_PUBLIC_URL: AUDIENCE,
    ...overrides,
  });
  const app = await buildApp(config);
  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= app.close();
    return closing;
  };
  onTestFinished(close);

  const storage = new LocalDiskStore(config.storageDir);

  return {
    app,
    config,
    dir,
    jwksFile,
    key,
    storage,
    close,
    async putFile(bytes, { name = 'file.bin', ctype = 'application/octet-stream' } = {}) {
      const buffer = typeof bytes === 'string' ? Buffer.from(bytes) : bytes;
      // An empty file is a stream with no chunks at all.
      const stored = await storage.put(Readable.from(buffer.length > 0 ? [buffer] : []));
      return { fid: nanoid(), obj: stored.id, name, ctype, size: stored.size, sha256: stored.sha256 };
    },
    async mint(file, mint = {}) {
      const { token } = await signDownloadToken(file, {
        key: mint.key ?? key.privateKey,
        kid: mint.kid ?? key.kid,
        issuer: mint.issuer ?? ISSUER,
        audience: mint.audience ?? AUDIENCE,
        subject: mint.subject ?? SUBJECT,
        ttlSeconds: mint.ttlSeconds ?? TTL_SECONDS,
        ...(mint.now ? { now: mint.now } : {}),
      });
      return token;
    },
  };
}
