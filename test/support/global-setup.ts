import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { buildDownloadServer } from './processes.ts';

/**
 * Once per run: B's bundle built from the current source, and an initialised PGlite data folder that test files copy (initdb takes seconds,
 * opening a copy well under one). In CI, the real Postgres must answer: a missing service fails
 * the run instead of quietly testing less.
 */
export default async function setup(project: TestProject) {
  const serverUrl = process.env.TEST_DATABASE_URL;
  if (serverUrl) {
    const client = new pg.Client({ connectionString: serverUrl, connectionTimeoutMillis: 5_000 });
    await client.connect().catch((error: unknown) => {
      throw new Error(`TEST_DATABASE_URL is set but Postgres does not answer: ${error}`);
    });
    await client.end();
  } else if (process.env.CI) {
    throw new Error('CI runs against real Postgres: set TEST_DATABASE_URL');
  }
  buildDownloadServer();
  const root = await mkdtemp(join(tmpdir(), 'sfh-pglite-template-'));
  const template = join(root, 'pg');
  const db = await PGlite.create(template);
  await db.close();
  project.provide('pgliteTemplate', template);
  return () => rm(root, { recursive: true, force: true });
}
