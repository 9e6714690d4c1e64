import { randomUUID } from 'node:crypto';
import { cp, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { inject } from 'vitest';
import { startEmbeddedPostgres } from '../../apps/app-server/src/embedded-postgres.ts';

export interface TestDatabase {
  /** Connection string for A's `pg` pool. */
  url: string;
  close(): Promise<void>;
}

/**
 * A database of one's own for a test file. With `TEST_DATABASE_URL` (CI): a fresh schema in that
 * Postgres, dropped afterwards. Otherwise: embedded PGlite served on a socket exactly as
 * `npm start` does, from a copy of an initialised data folder the global setup made once.
 */
export async function createTestDatabase(): Promise<TestDatabase> {
  const serverUrl = process.env.TEST_DATABASE_URL;
  if (serverUrl) {
    const schema = `test_${randomUUID().replaceAll('-', '')}`;
    await withClient(serverUrl, (client) => client.query(`CREATE SCHEMA ${schema}`));
    const url = new URL(serverUrl);
    url.searchParams.set('options', `-c search_path=${schema}`);
    return {
      url: url.toString(),
      close: () => withClient(serverUrl, (client) => client.query(`DROP SCHEMA ${schema} CASCADE`)),
    };
  }
  const dir = await mkdtemp(join(tmpdir(), 'sfh-db-'));
  await cp(inject('pgliteTemplate'), join(dir, 'pg'), { recursive: true });
  const embedded = await startEmbeddedPostgres(dir);
  return {
    url: embedded.url,
    async close() {
      await embedded.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function withClient(url: string, fn: (client: pg.Client) => Promise<unknown>): Promise<void> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000 });
  await client.connect();
  try {
    await fn(client);
  } finally {
    await client.end();
  }
}

declare module 'vitest' {
  export interface ProvidedContext {
    pgliteTemplate: string;
  }
}
