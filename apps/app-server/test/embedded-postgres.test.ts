import { spawn } from 'node:child_process';
import { cp, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { expect, inject, it, onTestFinished } from 'vitest';
import { startEmbeddedPostgres } from '../src/embedded-postgres.ts';

async function embedded() {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-embedded-'));
  await cp(inject('pgliteTemplate'), join(dir, 'pg'), { recursive: true });
  const db = await startEmbeddedPostgres(dir);
  const pool = new pg.Pool({ connectionString: db.url, max: 8 });
  onTestFinished(async () => {
    await pool.end();
    await db.close();
    await rm(dir, { recursive: true, force: true });
  });
  return { db, pool, dir };
}

// PGlite has one backend. Concurrent connections must never see each other's statements or
// results, even while another connection holds a transaction open (pglite-socket 0.2 mixed
// them up: every read below came back wrong now and then).
it('keeps concurrent connections apart: every statement gets its own result', async () => {
  const { pool } = await embedded();
  await pool.query('CREATE TABLE numbers (n int PRIMARY KEY)');
  await pool.query('INSERT INTO numbers SELECT generate_series(1, 500)');
  let stop = false;
  const writer = (async () => {
    while (!stop) {
      const client = await pool.connect();
      try {
        await client.query('BEGIN');
        await client.query('SELECT count(*) FROM numbers WHERE n > $1', [250]);
        await client.query('COMMIT');
      } finally {
        client.release();
      }
    }
  })();
  const wrong: string[] = [];
  await Promise.all(
    Array.from({ length: 5 }, async (_, reader) => {
      for (let i = 1; i <= 200; i++) {
        const n = ((reader * 200 + i) % 500) + 1;
        const { rows } = await pool.query<{ n: number; twice: number }>(
          'SELECT n, n * 2 AS twice FROM numbers WHERE n = $1',
          [n],
        );
        if (rows.length !== 1 || rows[0]?.n !== n || rows[0]?.twice !== 2 * n)
          wrong.push(`${n}: ${JSON.stringify(rows)}`);
      }
    }),
  );
  stop = true;
  await writer;
  expect(wrong).toEqual([]);
});

it('a connection that drops mid-transaction leaves the backend clean for the next', async () => {
  const { db, pool } = await embedded();
  await pool.query('CREATE TABLE t (v text)');
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  await client.query('BEGIN');
  await client.query(`INSERT INTO t VALUES ('never committed')`);
  // Gone without COMMIT or ROLLBACK (a crashed CLI, a killed process).
  (client as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  await client.end().catch(() => {});
  const { rows } = await pool.query('SELECT count(*)::int AS n FROM t');
  expect(rows[0]).toEqual({ n: 0 });
  await pool.query(`INSERT INTO t VALUES ('committed')`);
  expect((await pool.query('SELECT v FROM t')).rows).toEqual([{ v: 'committed' }]);
});

it('prepared statements are per connection, as on a real server, and go when it closes', async () => {
  const { db, pool } = await embedded();
  // One backend: its pg_prepared_statements lists every connection's statements.
  const observer = new pg.Client({ connectionString: db.url });
  await observer.connect();
  onTestFinished(() => observer.end());
  const prepared = async () =>
    (await observer.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_prepared_statements')).rows[0]?.n;
  const before = await prepared();
  // Eight connections give the same name to different statements, concurrently and repeatedly.
  const clients = await Promise.all(Array.from({ length: 8 }, () => pool.connect()));
  const wrong: string[] = [];
  await Promise.all(
    clients.map(async (client, i) => {
      for (let round = 0; round < 20; round++) {
        const { rows } = await client.query<{ v: number }>({
          name: 'same-name',
          text: `SELECT $1::int + ${i * 1000} AS v`,
          values: [round],
        });
        if (rows[0]?.v !== round + i * 1000)
          wrong.push(`client ${i}, round ${round}: ${JSON.stringify(rows)}`);
      }
    }),
  );
  expect(wrong).toEqual([]);
  expect(await prepared()).toBe((before ?? 0) + 8);
  for (const client of clients) client.release(true); // closes the connection
  await expect.poll(prepared).toBe(before);
  // A new connection starts with none of them.
  expect((await pool.query({ name: 'same-name', text: 'SELECT 7 AS v' })).rows).toEqual([{ v: 7 }]);
});

it('refuses a second server on the same data folder', async () => {
  const { dir } = await embedded();
  await expect(startEmbeddedPostgres(dir)).rejects.toThrow(/already in use/);
});

// A hostile or broken local client: 8 bytes whose length field is below the header's own size
// used to send the wire server into an endless loop, freezing A (and this test with it). So the
// database runs in a child process here, which the test kills if it hangs.
it.each([
  ['0 with an SSL request code', '00000000' + '04d2162f'],
  ['4 (shorter than its header)', '00000004' + '00030000'],
])(
  'closes a connection whose startup length is %s, and keeps serving the others',
  async (_case, hex) => {
    const dir = await mkdtemp(join(tmpdir(), 'sfh-embedded-'));
    onTestFinished(() => rm(dir, { recursive: true, force: true }));
    await cp(inject('pgliteTemplate'), join(dir, 'pg'), { recursive: true });
    const module = fileURLToPath(new URL('../src/embedded-postgres.ts', import.meta.url));
    const script = `
    import { connect } from 'node:net';
    import pg from 'pg';
    import { startEmbeddedPostgres } from ${JSON.stringify(module)};
    const db = await startEmbeddedPostgres(${JSON.stringify(dir)});
    const host = new URL(db.url).searchParams.get('host');
    const hostile = connect(host + '/.s.PGSQL.5432');
    hostile.on('error', () => {});
    hostile.on('connect', () => hostile.write(Buffer.from(${JSON.stringify(hex)}, 'hex')));
    const closed = new Promise((resolve) => hostile.on('close', resolve));
    await new Promise((resolve) => setTimeout(resolve, 200));
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    const { rows } = await client.query('SELECT 41 + 1 AS answer');
    await client.end();
    await closed;
    console.log('answer', rows[0].answer);
    await db.close();
  `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    onTestFinished(() => {
      child.kill('SIGKILL');
    });
    let output = '';
    child.stdout.on('data', (chunk) => {
      output += chunk;
    });
    child.stderr.on('data', (chunk) => {
      output += chunk;
    });
    const code = await Promise.race([
      new Promise<number | null>((resolve) => child.on('exit', resolve)),
      new Promise<string>((resolve) => setTimeout(() => resolve('hung'), 20_000)),
    ]);
    expect({ code, output }).toMatchObject({ code: 0, output: expect.stringContaining('answer 42') });
  },
  30_000,
);
