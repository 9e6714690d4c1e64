import { fileURLToPath } from 'node:url';
import fp from 'fastify-plugin';
import { runner } from 'node-pg-migrate';
import pg from 'pg';

declare module 'fastify' {
  interface FastifyInstance {
    db: pg.Pool;
  }
}

export interface DbOptions {
  databaseUrl: string;
  poolMax: number;
}

const MIGRATIONS_DIR = fileURLToPath(new URL('../../migrations', import.meta.url));

// bigint (file sizes) as a JS number: exact up to 8 PiB, which no file here reaches.
const types = {
  getTypeParser: ((oid: number, format?: 'text' | 'binary') =>
    oid === pg.types.builtins.INT8
      ? Number
      : pg.types.getTypeParser(oid, format)) as typeof pg.types.getTypeParser,
};

/** The Postgres pool (real Postgres or embedded PGlite, same client), migrated before use. */
export default fp(
  async (app, options: DbOptions) => {
    const pool = new pg.Pool({
      connectionString: options.databaseUrl,
      max: options.poolMax,
      // Without these a dead database makes requests hang instead of failing with 503.
      connectionTimeoutMillis: 5_000,
      query_timeout: 30_000,
      types,
    });
    // An idle client whose server went away emits 'error'; unhandled it would crash the process.
    pool.on('error', (error) => app.log.warn({ err: error }, 'idle database connection failed'));
    app.decorate('db', pool);
    app.addHook('onClose', () => pool.end());
    await migrate(pool);
  },
  { name: 'db' },
);

/** Applies pending migrations under node-pg-migrate's advisory lock. */
export async function migrate(pool: pg.Pool): Promise<void> {
  const client = await pool.connect();
  try {
    // Migrate the schema the connection uses (its search_path), migrations table included;
    // node-pg-migrate would otherwise keep its bookkeeping in "public" whatever the path says.
    const { rows } = await client.query<{ schema: string }>('SELECT current_schema() AS schema');
    await runner({
      dbClient: client,
      schema: rows[0]?.schema ?? 'public',
      dir: MIGRATIONS_DIR,
      direction: 'up',
      migrationsTable: 'pgmigrations',
      // Replicas (and the CLI) starting together wait for each other instead of failing.
      advisoryLockMode: 'wait',
      log: () => {},
    });
  } finally {
    client.release();
  }
}
