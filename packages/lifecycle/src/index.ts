import { chmod, lstat, mkdir, readdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { ConfigError } from '@sfh/config';
import type { FastifyInstance } from 'fastify';

/**
 * Runs a server's `main`; a configuration error stops the process with its message (which names
 * the variable) and exit code 1, without a stack trace to dig through.
 */
export function runMain(main: () => Promise<void>): void {
  main().catch((error: unknown) => {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`);
    } else {
      process.stderr.write(
        `Failed to start: ${error instanceof Error ? (error.stack ?? error.message) : error}\n`,
      );
    }
    process.exit(1);
  });
}

/**
 * Drains `app` on SIGTERM or SIGINT, however often they arrive (supervisors and process groups
 * deliver them more than once): new requests get 503 and new connections are refused, requests in
 * flight get `graceSeconds` to finish, then `afterClose` runs and the process exits 0.
 * Started by `npm start` (`infra/start.ts`, with an IPC channel), it also drains when the
 * launcher goes away, however it died: a server never lives on as an orphan holding its port.
 */
export function closeOnSignals(
  app: FastifyInstance,
  graceSeconds: number,
  afterClose?: () => Promise<void>,
): void {
  let closing = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (closing) return;
    closing = true;
    app.log.info({ signal, graceSeconds }, 'shutting down: draining requests in flight');
    const timer = setTimeout(() => {
      app.log.warn('grace period over: closing the connections still open');
      app.server.closeAllConnections();
    }, graceSeconds * 1000);
    timer.unref();
    app
      .close()
      .then(afterClose)
      .then(
        () => process.exit(0),
        (error: unknown) => {
          app.log.error({ err: error }, 'error while shutting down');
          process.exit(1);
        },
      );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  if (process.connected) process.once('disconnect', () => onSignal('SIGTERM'));
}

/** What a server tells `infra/start.ts` once it is ready. */
export interface ReadyMessage {
  ready: { server: string; publicUrl: string };
}

/**
 * The one "ready" line of a server: where it listens and what it publishes. Under `npm start`
 * the launcher hears it too, and prints one line once every server is ready.
 */
export function announceReady(
  app: FastifyInstance,
  server: string,
  publicUrl: string,
  fields: Record<string, unknown>,
): void {
  const listening = app
    .addresses()
    .map((a) =>
      typeof a === 'string' ? a : `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`,
    );
  app.log.info(
    { listening, publicUrl, ...fields },
    `${server} ready at ${publicUrl}, listening on ${listening.join(', ')}`,
  );
  process.send?.({ ready: { server, publicUrl } } satisfies ReadyMessage);
}

/**
 * Makes `dir` and everything below it private to this process's user (folders 0700, files
 * 0600), and everything the process creates from now on too (umask 077). Defends the embedded
 * database (whose write-ahead log can hold a plain private signing key), the session secret,
 * the replay journal and stored files against other local users, also in a `DATA_DIR` left by
 * an earlier version with world-readable modes. Symbolic links are not followed; `skip` names
 * folders left alone (another server's, such as the storage B only reads), and so is anything
 * on a read-only mount.
 */
export async function makePrivate(dir: string, options: { skip?: string[] } = {}): Promise<void> {
  process.umask(0o077);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const skip = new Set((options.skip ?? []).map((path) => resolve(path)));
  async function visit(path: string): Promise<void> {
    if (skip.has(resolve(path))) return;
    try {
      const info = await lstat(path);
      if (info.isSymbolicLink()) return;
      if ((info.mode & 0o077) !== 0) await chmod(path, info.mode & 0o700);
      if (info.isDirectory()) {
        for (const entry of await readdir(path)) await visit(join(path, entry));
      }
    } catch (error) {
      // Gone meanwhile (a temporary file of the other server): nothing left to protect. On a
      // read-only mount nobody writes through this process, and modes cannot change.
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'EROFS') throw error;
    }
  }
  await visit(dir);
}
