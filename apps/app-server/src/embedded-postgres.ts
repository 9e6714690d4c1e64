import { mkdir, rm, stat } from 'node:fs/promises';
import { connect } from 'node:net';
import { join, resolve } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { PGLiteSocketServer } from '@electric-sql/pglite-socket';

export interface EmbeddedPostgres {
  /** A `pg` connection string for the Unix socket the database is served on. */
  url: string;
  close(): Promise<void>;
}

/**
 * Serves PGlite (WASM Postgres, data in `DATA_DIR/pg`) on a Unix socket in `DATA_DIR/run`, so A
 * talks to it through `pg` exactly as to a real Postgres (one data-access path), and the ops CLI
 * can reach the same database while A holds it open. The socket's folder is private to the user.
 */
export async function startEmbeddedPostgres(
  dataDir: string,
  maxConnections: number,
): Promise<EmbeddedPostgres> {
  const pgDir = resolve(dataDir, 'pg');
  const runDir = resolve(dataDir, 'run');
  const socketPath = join(runDir, '.s.PGSQL.5432');
  if (socketPath.length > 100) {
    throw new Error(`DATA_DIR is too deep for a Unix socket path (${socketPath}); choose a shorter DATA_DIR`);
  }
  await mkdir(pgDir, { recursive: true });
  await mkdir(runDir, { recursive: true, mode: 0o700 });
  if (await isServing(socketPath)) {
    throw new Error(
      `The embedded database in ${pgDir} is already in use by another process (an app server?)`,
    );
  }
  // A socket file left by a process that crashed.
  await rm(socketPath, { force: true });
  const db = await PGlite.create(pgDir);
  const server = new PGLiteSocketServer({ db, path: socketPath, maxConnections });
  await server.start();
  return {
    url: embeddedDatabaseUrl(dataDir),
    async close() {
      await server.stop();
      await db.close();
    },
  };
}

/**
 * For the ops CLI: the embedded database of `dataDir` through the running A's socket, or, when
 * no A is running, served by this process for as long as it needs it.
 */
export async function openEmbeddedPostgres(dataDir: string): Promise<EmbeddedPostgres> {
  if (await isServing(join(resolve(dataDir, 'run'), '.s.PGSQL.5432'))) {
    return { url: embeddedDatabaseUrl(dataDir), close: async () => {} };
  }
  return startEmbeddedPostgres(dataDir, 2);
}

function embeddedDatabaseUrl(dataDir: string): string {
  return `postgresql://postgres@localhost/postgres?host=${encodeURIComponent(resolve(dataDir, 'run'))}`;
}

async function isServing(socketPath: string): Promise<boolean> {
  if (!(await stat(socketPath).catch(() => undefined))) return false;
  return new Promise((done) => {
    const socket = connect(socketPath);
    socket.once('connect', () => {
      socket.destroy();
      done(true);
    });
    socket.once('error', () => done(false));
  });
}
