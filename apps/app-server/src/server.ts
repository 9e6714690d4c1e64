import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { announceReady, closeOnSignals, listen, makePrivate, runMain } from '@sfh/lifecycle';
import { buildApp } from './app.ts';
import { loadConfig } from './config.ts';
import { startEmbeddedPostgres } from './embedded-postgres.ts';

runMain(async () => {
  const config = loadConfig(process.env);
  await makePrivate(config.DATA_DIR);
  const embedded = config.DATABASE_URL ? undefined : await startEmbeddedPostgres(config.DATA_DIR);
  const app = await buildApp(config, {
    databaseUrl: config.DATABASE_URL ?? (embedded?.url as string),
    sessionSecret: config.SESSION_SECRET ?? (await developmentSecret(config.DATA_DIR)),
  });
  if (!config.kek) {
    // Production refuses to start without it (config.ts); development must not pass unnoticed.
    app.log.warn(
      'KEY_ENCRYPTION_KEY is not set: the private signing keys are stored UNENCRYPTED in the database. Anyone who can read it can mint download tokens for every file. Development only: set KEY_ENCRYPTION_KEY (32 random bytes, base64url) for anything else.',
    );
  }
  closeOnSignals(app, config.SHUTDOWN_GRACE_SECONDS, async () => embedded?.close());
  await listen(app, { port: config.APP_PORT, host: config.HOST, socketPath: config.APP_SOCKET_PATH });
  announceReady(app, 'app server (A)', config.APP_PUBLIC_URL, {
    database: embedded ? 'embedded PGlite' : 'Postgres',
    storage: config.s3 ? `s3://${config.s3.bucket}/${config.s3.prefix}` : config.storageDir,
  });
});

/** Development only (production requires SESSION_SECRET): one random secret kept in DATA_DIR. */
async function developmentSecret(dataDir: string): Promise<string> {
  const file = join(dataDir, 'session-secret');
  try {
    return (await readFile(file, 'utf8')).trim();
  } catch {
    const secret = randomBytes(32).toString('base64url');
    await writeFile(file, secret, { mode: 0o600, flag: 'wx' }).catch(() => {});
    return (await readFile(file, 'utf8')).trim();
  }
}
