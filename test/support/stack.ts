import { cp, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inject } from 'vitest';
import { createTestDatabase, type TestDatabase } from './database.ts';
import { APP_SERVER, DOWNLOAD_SERVER, freePort, type ServerProcess, startServer } from './processes.ts';
import { freshPrefix, s3Env } from './s3.ts';

/** A's argon2 cost lowered through its config, as in every test that starts A. */
export const CHEAP_PASSWORDS = { ARGON2_MEMORY_KIB: '64', ARGON2_TIME_COST: '1' };

export interface StackOptions {
  /**
   * `embedded` (default): PGlite in the data folder, copied from the global setup's template, as
   * `npm start` runs. `postgres`: a database of its own from `createTestDatabase()` (a schema in
   * TEST_DATABASE_URL's Postgres).
   */
  database?: 'embedded' | 'postgres';
  /**
   * `local` (default): one DATA_DIR for both, the files in it. `s3`: the bytes in the bucket of
   * infra/s3-local.sh under a fresh prefix, A with read-write and B with read-only credentials,
   * each on a DATA_DIR of its own: they share nothing but the bucket.
   */
  storage?: 'local' | 's3';
  /** More environment for both servers. */
  env?: Record<string, string>;
  /** More environment for A only. */
  appEnv?: Record<string, string>;
  /** More environment for B only. */
  downloadEnv?: Record<string, string>;
}

export interface Stack {
  a: ServerProcess;
  b: ServerProcess;
  appOrigin: string;
  downloadOrigin: string;
  /** DATA_DIR of both, as with `npm start`: A's embedded database, B's replay journal, files/. With S3, A's. */
  dataDir: string;
  /** With S3: the key prefix of this stack's objects. */
  s3Prefix: string | undefined;
  /** Everything A was started with: for the ops CLI, or to start A again on the same data. */
  appEnv: Record<string, string>;
  /** Stops both servers, drops the database and removes the data folder. */
  stop(): Promise<void>;
}

/** A and B as real processes on free ports, sharing one data folder; both ready when it resolves. */
export async function startStack(options: StackOptions = {}): Promise<Stack> {
  const dataDir = await mkdtemp(join(tmpdir(), 'sfh-stack-'));
  const downloadDataDir = options.storage === 's3' ? await mkdtemp(join(tmpdir(), 'sfh-stack-b-')) : dataDir;
  let db: TestDatabase | undefined;
  let a: ServerProcess | undefined;
  let b: ServerProcess | undefined;
  const stop = async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    await db?.close();
    await rm(dataDir, { recursive: true, force: true });
    await rm(downloadDataDir, { recursive: true, force: true });
  };
  try {
    const [appPort, downloadPort] = [await freePort(), await freePort()];
    const appOrigin = `http://127.0.0.1:${appPort}`;
    const downloadOrigin = `http://127.0.0.1:${downloadPort}`;
    const shared = {
      DATA_DIR: dataDir,
      APP_PUBLIC_URL: appOrigin,
      DOWNLOAD_PUBLIC_URL: downloadOrigin,
      ...options.env,
    };
    const databaseEnv: Record<string, string> = {};
    if (options.database === 'postgres') {
      db = await createTestDatabase();
      databaseEnv.DATABASE_URL = db.url;
    } else {
      // An initialised data folder, so the test does not wait for initdb.
      await cp(inject('pgliteTemplate'), join(dataDir, 'pg'), { recursive: true });
    }
    const s3Prefix = options.storage === 's3' ? freshPrefix() : undefined;
    const appEnv = {
      ...shared,
      ...databaseEnv,
      ...(s3Prefix !== undefined && s3Env(s3Prefix, 'writer')),
      APP_PORT: String(appPort),
      ...CHEAP_PASSWORDS,
      ...options.appEnv,
    };
    a = await startServer(APP_SERVER, appEnv, `${appOrigin}/readyz`);
    // After A: B is ready once it has read A's key set.
    b = await startServer(
      DOWNLOAD_SERVER,
      {
        ...shared,
        ...(s3Prefix !== undefined && { ...s3Env(s3Prefix, 'reader'), DATA_DIR: downloadDataDir }),
        DOWNLOAD_PORT: String(downloadPort),
        ...options.downloadEnv,
      },
      `${downloadOrigin}/readyz`,
    );
    return { a, b, appOrigin, downloadOrigin, dataDir, s3Prefix, appEnv, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}
