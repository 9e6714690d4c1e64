/**
 * What the benchmark serves and with what: a signing key and its JWKS file, files in B's store
 * (and hard links to them for the baselines), B and baseline processes, download tokens, and
 * a signed-in user on A.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { link, mkdir, open } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { type FileClaims, signDownloadToken } from '@sfh/download-token';
import { LocalDiskStore } from '@sfh/storage';
import { nanoid } from 'nanoid';
import { CookieJar } from '../support/http-client.ts';
import { DOWNLOAD_SERVER, freePort } from '../support/processes.ts';
import type { SigningKey } from '../support/signing-key.ts';
import { MIB, ROOT, type Server, startProcess } from './lib.ts';

export const APP_PUBLIC_URL = 'http://a.bench';

/** Puts `bytes` into B's store and hard-links it as `staticDir/name` for the baselines. */
export async function putSmallFile(
  storageDir: string,
  staticDir: string,
  name: string,
  bytes: Buffer,
): Promise<FileClaims> {
  const stored = await new LocalDiskStore(storageDir).put(Readable.from([bytes]));
  await link(join(storageDir, stored.id.slice(0, 2), stored.id), join(staticDir, name));
  return claims(stored.id, name, stored.size, stored.sha256);
}

/**
 * Writes a large object straight into B's store layout (`<root>/<shard>/<id>`; `put` would fsync
 * a GiB for nothing): one 1 MiB random buffer repeated, hashed on the way. Hard-linked for the
 * baselines like the small file.
 */
export async function putLargeFile(
  storageDir: string,
  staticDir: string,
  name: string,
  size: number,
): Promise<FileClaims> {
  const id = nanoid();
  const shard = join(storageDir, id.slice(0, 2));
  await mkdir(shard, { recursive: true });
  const path = join(shard, id);
  const chunk = randomBytes(MIB);
  const hash = createHash('sha256');
  const handle = await open(path, 'wx', 0o600);
  try {
    for (let written = 0; written < size; written += chunk.length) {
      const part = chunk.subarray(0, Math.min(chunk.length, size - written));
      hash.update(part);
      await handle.write(part);
    }
  } finally {
    await handle.close();
  }
  await link(path, join(staticDir, name));
  return claims(id, name, size, hash.digest('hex'));
}

const claims = (obj: string, name: string, size: number, sha256: string): FileClaims => ({
  fid: nanoid(),
  obj,
  name,
  ctype: 'application/octet-stream',
  size,
  sha256,
});

export interface BProcess {
  server: Server;
  origin: string;
}

/** B as `npm run start:download` runs it, keys from the JWKS file, one log line per request. */
export async function startB(options: {
  dir: string;
  storageDir: string;
  jwksFile: string;
  cpu: string | undefined;
  env?: Record<string, string>;
  nodeArgs?: string[];
  port?: number;
  /** The node binary (default: the one running the bench). */
  node?: string;
}): Promise<BProcess> {
  const port = options.port ?? (await freePort());
  const origin = `http://127.0.0.1:${port}`;
  const server = await startProcess({
    entry: DOWNLOAD_SERVER,
    env: {
      DATA_DIR: join(options.dir, `b-data-${port}`),
      STORAGE_DIR: options.storageDir,
      JWKS_FILE: options.jwksFile,
      APP_PUBLIC_URL,
      DOWNLOAD_PUBLIC_URL: origin,
      DOWNLOAD_PORT: String(port),
      LOG_LEVEL: process.env.BENCH_B_LOG_LEVEL ?? 'info',
      ...options.env,
    },
    readyUrl: `${origin}/readyz`,
    cpu: options.cpu,
    ...(options.nodeArgs ? { nodeArgs: options.nodeArgs } : {}),
    ...(options.node ? { node: options.node } : {}),
  });
  return { server, origin };
}

export async function startBaseline(
  mode: 'http' | 'static',
  dir: string,
  cpu: string | undefined,
  node?: string,
) {
  const port = await freePort();
  const origin = `http://127.0.0.1:${port}`;
  const server = await startProcess({
    entry: 'test/bench/baseline-server.ts',
    env: { MODE: mode, DIR: dir, PORT: String(port) },
    readyUrl: `${origin}/small.bin`,
    cpu,
    ...(node ? { node } : {}),
  });
  return { server, origin };
}

/** One token, minted here as A mints it. */
export async function mintOne(key: SigningKey, audience: string, file: FileClaims): Promise<string> {
  const { token } = await signDownloadToken(file, {
    key: key.privateKey,
    kid: key.kid,
    issuer: APP_PUBLIC_URL,
    audience,
    subject: 'bench-user',
    ttlSeconds: 300,
  });
  return token;
}

/**
 * `count` tokens for `file`, minted by `processes` child processes in parallel (before a
 * measurement, so minting never competes with the server under test).
 */
export async function mintMany(
  key: SigningKey,
  audience: string,
  file: FileClaims,
  count: number,
  processes: number,
  /** `taskset -c` list for the children, which would otherwise inherit this process's one core. */
  cpus?: string,
): Promise<string[]> {
  const share = Math.ceil(count / processes);
  const parts = await Promise.all(
    Array.from({ length: processes }, async (_, i) => {
      const n = Math.max(0, Math.min(share, count - i * share));
      if (n === 0) return [];
      const args = ['--import', 'tsx', 'test/bench/mint-child.ts'];
      const [command, argv] = cpus
        ? ['taskset', ['-c', cpus, process.execPath, ...args]]
        : [process.execPath, args];
      const child = spawn(command as string, argv as string[], {
        cwd: ROOT,
        env: {
          PATH: process.env.PATH,
          HOME: process.env.HOME,
          MINT_JWK: JSON.stringify(key.privateJwk),
          MINT_ALG: key.alg,
          MINT_KID: key.kid,
          MINT_ISSUER: APP_PUBLIC_URL,
          MINT_AUDIENCE: audience,
          MINT_FILE: JSON.stringify(file),
          MINT_COUNT: String(n),
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const out: Buffer[] = [];
      let err = '';
      child.stdout.on('data', (chunk: Buffer) => out.push(chunk));
      child.stderr.on('data', (chunk) => {
        err += chunk;
      });
      const [code] = await once(child, 'close');
      if (code !== 0) throw new Error(`mint-child exited with ${code}: ${err}`);
      const tokens = Buffer.concat(out).toString('utf8').split('\n').filter(Boolean);
      if (tokens.length !== n) throw new Error(`mint-child made ${tokens.length} tokens, not ${n}`);
      return tokens;
    }),
  );
  return parts.flat();
}

// ---------------------------------------------------------------------------------------------
// A signed-in user on A

/** A browser's view of A: its cookies (session, device), and a CSRF token for the session. */
export class AppUser {
  readonly jar = new CookieJar();
  csrf = '';

  constructor(readonly origin: string) {}

  async request(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    const cookie = this.jar.header();
    if (cookie) headers.set('cookie', cookie);
    if (this.csrf && init.method && init.method !== 'GET') headers.set('x-csrf-token', this.csrf);
    const response = await fetch(new URL(path, this.origin), { ...init, headers, redirect: 'manual' });
    this.jar.update(response);
    return response;
  }

  async refreshCsrf(): Promise<void> {
    const response = await this.request('/api/csrf');
    this.csrf = ((await response.json()) as { token: string }).token;
  }

  /** Registers (which signs in) and uploads `bytes`; returns the file id. */
  async setUp(bytes: Buffer, name: string): Promise<string> {
    await this.refreshCsrf();
    const register = await this.request('/api/auth/register', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ username: `bench${nanoid(6)}`, password: 'correct horse battery staple' }),
    });
    if (register.status !== 201) throw new Error(`register: ${register.status} ${await register.text()}`);
    // Signing in regenerates the session, which drops its CSRF secret.
    await this.refreshCsrf();
    const form = new FormData();
    form.append('file', new Blob([bytes]), name);
    const upload = await this.request('/api/files', { method: 'POST', body: form });
    if (upload.status !== 201) throw new Error(`upload: ${upload.status} ${await upload.text()}`);
    return ((await upload.json()) as { file: { id: string } }).file.id;
  }
}

/** How many users share a minting run. */
export const MINTING_USERS = 32;

/**
 * `count` users on A, each signed in with one small file uploaded, and their mint requests
 * taking turns: the load of a minting run, as many users (not one) make it.
 */
export async function mintingUsers(origin: string, count: number, bytes: Buffer) {
  const users = await Promise.all(
    Array.from({ length: count }, async () => {
      const user = new AppUser(origin);
      return { user, fileId: await user.setUp(bytes, 'small.bin') };
    }),
  );
  let turn = 0;
  return {
    first: users[0] as { user: AppUser; fileId: string },
    next() {
      const { user, fileId } = users[turn++ % users.length] as { user: AppUser; fileId: string };
      return {
        path: `/api/files/${fileId}/download-token`,
        headers: { cookie: user.jar.header() ?? '', 'x-csrf-token': user.csrf },
      };
    },
  };
}
