import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TOKEN_ALGORITHM, verifyDownloadToken } from '@sfh/download-token';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import { type CryptoKey, importJWK, type JWK } from 'jose';
import { afterAll, beforeAll, onTestFinished } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../../../test/support/database.ts';
import { type BuildOptions, buildApp } from '../src/app.ts';
import { type AppConfig, loadConfig } from '../src/config.ts';

export const TEST_SESSION_SECRET = 'test-session-secret-that-is-long-enough';

/** One database for the whole test file (its own schema, or its own PGlite), dropped afterwards. */
export function useTestDatabase(): () => TestDatabase {
  let db: TestDatabase | undefined;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db?.close();
  });
  return () => {
    if (!db) throw new Error('useTestDatabase() must be called at the top of the test file');
    return db;
  };
}

/**
 * Builds A on the test database with cheap password hashing (through config, as production
 * would configure it) and closes it when the test ends.
 */
export async function buildTestApp(
  db: TestDatabase,
  env: Record<string, string> = {},
  options: Pick<BuildOptions, 'logStream'> = {},
): Promise<{ app: FastifyInstance; config: AppConfig }> {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-app-'));
  const config = loadConfig({
    DATA_DIR: dir,
    LOG_LEVEL: 'silent',
    ARGON2_MEMORY_KIB: '64',
    ARGON2_TIME_COST: '1',
    APP_PUBLIC_URL: 'http://a.test',
    DOWNLOAD_PUBLIC_URL: 'http://b.test',
    ...env,
  });
  const app = await buildApp(config, {
    databaseUrl: db.url,
    sessionSecret: env.SESSION_SECRET ?? TEST_SESSION_SECRET,
    ...options,
  });
  onTestFinished(async () => {
    await app.close();
    await rm(dir, { recursive: true, force: true });
  });
  return { app, config };
}

/**
 * A client with a cookie jar that fetches and sends the CSRF token like the UI does, on top
 * of `app.inject`.
 */
export class TestClient {
  cookies = new Map<string, string>();
  csrf: string | undefined;

  constructor(readonly app: FastifyInstance) {}

  async request(options: InjectOptions & { csrf?: boolean }): Promise<LightMyRequestResponse> {
    const { csrf = true, ...inject } = options;
    const headers: Record<string, string> = { ...(inject.headers as Record<string, string>) };
    const unsafe = !['GET', 'HEAD', 'OPTIONS'].includes((inject.method ?? 'GET').toUpperCase());
    if (unsafe && csrf) headers['x-csrf-token'] ??= await this.csrfToken();
    if (this.cookies.size)
      headers.cookie = [...this.cookies].map(([name, value]) => `${name}=${value}`).join('; ');
    const response = await this.app.inject({ ...inject, headers });
    for (const cookie of response.cookies as {
      name: string;
      value: string;
      maxAge?: number;
      expires?: Date;
    }[]) {
      const expired = cookie.maxAge === 0 || (cookie.expires && cookie.expires.getTime() <= Date.now());
      if (expired || cookie.value === '') this.cookies.delete(cookie.name);
      else this.cookies.set(cookie.name, cookie.value);
    }
    return response;
  }

  /** The CSRF token of the current session (fetched anew after every sign-in, which changes it). */
  async csrfToken(): Promise<string> {
    const response = await this.request({ method: 'GET', url: '/api/csrf' });
    this.csrf = response.json<{ token: string }>().token;
    return this.csrf;
  }

  async register(
    username = `user${Math.random().toString(36).slice(2, 10)}`,
    password = 'correct horse battery',
  ) {
    const response = await this.request({
      method: 'POST',
      url: '/api/auth/register',
      payload: { username, password },
    });
    if (response.statusCode !== 201)
      throw new Error(`register failed: ${response.statusCode} ${response.body}`);
    return response.json<{ user: { id: string; username: string } }>().user;
  }

  /** `POST /api/auth/login` with JSON credentials; the response, for the caller to check. */
  login(username: string, password: string): Promise<LightMyRequestResponse> {
    return this.request({ method: 'POST', url: '/api/auth/login', payload: { username, password } });
  }

  async upload(name: string, content: Buffer | string, contentType = 'application/octet-stream') {
    const boundary = `----sfh${Math.random().toString(36).slice(2)}`;
    const body = Buffer.concat([
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${name}"\r\nContent-Type: ${contentType}\r\n\r\n`,
      ),
      Buffer.from(content),
      Buffer.from(`\r\n--${boundary}--\r\n`),
    ]);
    return this.request({
      method: 'POST',
      url: '/api/files',
      payload: body,
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
    });
  }
}

/** A token minted by `app`, verified as B would: against the app's own JWKS, with B's defaults. */
export async function claimsOf(app: FastifyInstance, token: string) {
  const { keys } = (await app.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json<{
    keys: JWK[];
  }>();
  return verifyDownloadToken(
    token,
    async (kid) => {
      const jwk = keys.find((key) => key.kid === kid);
      return jwk ? ((await importJWK(jwk, jwk.alg)) as CryptoKey) : undefined;
    },
    {
      algorithms: [TOKEN_ALGORITHM],
      issuer: 'http://a.test',
      audience: 'http://b.test',
      maxTokenAgeSeconds: 300,
      clockToleranceSeconds: 5,
    },
  );
}
