import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { open, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { makePrivate } from '@sfh/lifecycle';
import { Command, CommanderError } from 'commander';
import pg from 'pg';
import { loadConfig } from './config.ts';
import { openEmbeddedPostgres } from './embedded-postgres.ts';
import { KeyLifecycle } from './keys/lifecycle.ts';
import { checkKeyEncryption, createSigningKey } from './keys/material.ts';
import { migrate } from './plugins/db.ts';
import { publicJwk } from './plugins/keys.ts';
import { type SigningKeyRecord, signingKeysRepository } from './repositories/signing-keys.ts';

// The ops CLI for A's signing keys (README, "Signing keys"). Runs with A's environment, while
// the servers run, on Postgres or on the embedded database (through A's socket, or its own
// when A is stopped). Exit codes: 0 done, 1 failed, 2 wrong usage.

type Keys = ReturnType<typeof signingKeysRepository>;

const time = (date: Date | null) => date?.toISOString().replace(/\.\d{3}Z$/, 'Z') ?? '-';
const view = (key: SigningKeyRecord) => ({
  kid: key.kid,
  state: key.state,
  createdAt: key.createdAt.toISOString(),
  activatesAt: key.activatesAt?.toISOString() ?? null,
  activatedAt: key.activatedAt?.toISOString() ?? null,
  retiresAt: key.retiresAt?.toISOString() ?? null,
  revokedAt: key.revokedAt?.toISOString() ?? null,
});

async function main(argv: string[]): Promise<number> {
  const program = new Command('keys')
    .description("Manage A's download-token signing keys")
    .option('--json', 'print JSON instead of text')
    .exitOverride()
    .configureOutput({ writeErr: (text) => process.stderr.write(text) });
  let run:
    | ((keys: Keys, lifecycle: KeyLifecycle, json: boolean, kek: Buffer | undefined) => Promise<number>)
    | undefined;

  program
    .command('list')
    .description('one key per line: kid, state, created, activated, retires')
    .action(() => {
      run = async (keys, _lifecycle, json) => {
        const all = await keys.list();
        if (json) return print(all.map(view));
        const rows = all.map((k) => [
          k.kid,
          k.state,
          time(k.createdAt),
          k.activatedAt ? time(k.activatedAt) : k.state === 'next' ? `from ${time(k.activatesAt)}` : '-',
          k.state === 'revoked' ? `revoked ${time(k.revokedAt)}` : time(k.retiresAt),
        ]);
        const table = [['KID', 'STATE', 'CREATED', 'ACTIVATED', 'RETIRES'], ...rows];
        const widths =
          table[0]?.map((_, i) => Math.max(...table.map((row) => (row[i] as string).length))) ?? [];
        for (const row of table)
          console.log(
            row
              .map((cell, i) => cell.padEnd(widths[i] ?? 0))
              .join('  ')
              .trimEnd(),
          );
        return 0;
      };
    });

  program
    .command('rotate')
    .description('publish a new key now (state next); it becomes current once B can know it')
    .action(() => {
      run = async (keys, lifecycle, json, kek) => {
        checkKeyEncryption(await keys.list(), kek);
        const key = (await keys.locked((tx) => lifecycle.rotate(tx, new Date()))) as SigningKeyRecord;
        if (json) return print(view(key));
        console.log(`published ${key.kid} (next); it signs from ${time(key.activatesAt)}`);
        return 0;
      };
    });

  program
    .command('revoke')
    .argument('<kid>', 'the key to revoke')
    .description('remove a key at once; if it was current, the next key (or a new one) takes over at once')
    .action((kid: string) => {
      run = async (keys, lifecycle, json, kek) => {
        // Revoking a plain key under a KEK is how such a key is got rid of: only the others count.
        checkKeyEncryption(
          (await keys.list()).filter((key) => key.kid !== kid),
          kek,
        );
        const was = await keys.locked((tx) => lifecycle.revoke(tx, kid, new Date()));
        if (!was) {
          process.stderr.write(`no published key ${kid}\n`);
          return 1;
        }
        const current = await keys.current();
        if (json) return print({ revoked: kid, was, current: current?.kid ?? null });
        console.log(`revoked ${kid} (was ${was}); signing with ${current?.kid}`);
        return 0;
      };
    });

  program
    .command('export-jwks')
    .argument('<file>', 'where to write the public key set')
    .description('write the public set, for a B that reads JWKS_FILE')
    .action((file: string) => {
      run = async (keys, _lifecycle, json) => {
        const set = { keys: (await keys.published()).map(publicJwk) };
        await writePublicFile(file, `${JSON.stringify(set, null, 2)}\n`);
        if (json) return print({ file, keys: set.keys.length });
        console.log(`wrote ${set.keys.length} public keys to ${file}`);
        return 0;
      };
    });

  try {
    await program.parseAsync(argv);
  } catch (error) {
    if (error instanceof CommanderError) return error.exitCode === 0 ? 0 : 2;
    throw error;
  }
  if (!run) {
    program.outputHelp({ error: true });
    return 2;
  }

  const config = loadConfig(process.env);
  // With A stopped the CLI opens the embedded database itself: what it writes stays private too.
  if (!config.DATABASE_URL) await makePrivate(config.DATA_DIR);
  const embedded = config.DATABASE_URL ? undefined : await openEmbeddedPostgres(config.DATA_DIR);
  const pool = new pg.Pool({
    connectionString: config.DATABASE_URL ?? embedded?.url,
    max: 1,
    connectionTimeoutMillis: 5_000,
  });
  try {
    await migrate(pool);
    const lifecycle = new KeyLifecycle(config.keyPolicy, () => createSigningKey(config.kek));
    return await run(signingKeysRepository(pool), lifecycle, Boolean(program.opts().json), config.kek);
  } finally {
    await pool.end();
    await embedded?.close();
  }
}

const STICKY = 0o1000;

/**
 * Replaces `file` with `text`, mode 0644, atomically: a B watching it never reads half a key set.
 * B trusts whatever this file holds, so nobody else may choose or own what lands there. In a
 * folder other users can write, a fixed temporary name (`<file>.tmp`) let them plant a symbolic
 * link there (the CLI then overwrote its target) or create the file first (and own the key set B
 * reads, then mint tokens). So: a new file with a random name, created exclusively (`O_EXCL`
 * follows no link and fails on anything already there), written, fsynced, then renamed. A folder
 * anyone can write without the sticky bit is refused: there anyone can also rename over the
 * result.
 */
async function writePublicFile(file: string, text: string): Promise<void> {
  const dir = dirname(resolve(file));
  const folder = await stat(dir);
  if ((folder.mode & 0o002) !== 0 && (folder.mode & STICKY) === 0) {
    throw new Error(
      `refusing to write ${file}: any user can write to ${dir} (mode ${(folder.mode & 0o7777).toString(8)}, no sticky bit) and so replace the key set B trusts; choose a folder only you can write to`,
    );
  }
  const temporary = join(dir, `.${basename(file)}.${randomBytes(8).toString('hex')}.tmp`);
  const handle = await open(
    temporary,
    constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
    0o644,
  );
  try {
    // The umask (077 once the CLI made DATA_DIR private) must not hide public keys from B.
    await handle.chmod(0o644);
    await handle.writeFile(text);
    await handle.sync();
    await handle.close();
    await rename(temporary, file);
  } catch (error) {
    await handle.close().catch(() => {});
    await rm(temporary, { force: true });
    throw error;
  }
}

function print(value: unknown): number {
  console.log(JSON.stringify(value, null, 2));
  return 0;
}

main(process.argv).then(
  (code) => process.exit(code),
  (error: unknown) => {
    process.stderr.write(`keys: ${error instanceof Error ? error.message : error}\n`);
    process.exit(1);
  },
);
