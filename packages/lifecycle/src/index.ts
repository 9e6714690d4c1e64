import { chmod, lstat, mkdir, readdir, rm, stat } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { ConfigError, UNIX_SOCKET_PEER } from '@sfh/config';
import type { FastifyInstance } from 'fastify';

/** The Unix socket each app listens on (`listen`), for its "ready" line. */
const sockets = new WeakMap<FastifyInstance, string>();

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
  const socketPath = sockets.get(app);
  const listening = [
    ...app
      .addresses()
      .map((a) =>
        typeof a === 'string' ? a : `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`,
      ),
    ...(socketPath ? [`unix:${socketPath}`] : []),
  ];
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

/**
 * Listens on `port` and `host`, and on the Unix socket `socketPath` too when it is set. A
 * proxy on the same host reaches the server through the socket, which only users the socket's
 * folder lets in can connect to; on the TCP port any local user could, and claim any client
 * address in `X-Forwarded-For`. So the folder must be closed to others (owner only, or the
 * proxy's group: 0700 or 0750; created 0700 when missing) and owned by this user or root; the
 * socket is 0660. Connections on the socket are served by the app's own HTTP server (same
 * timeouts, same drain): closing the app stops both listeners, and the socket file goes with it.
 */
export async function listen(
  app: FastifyInstance,
  options: { port: number; host: string; socketPath?: string | undefined },
): Promise<void> {
  const { socketPath } = options;
  if (!socketPath) {
    await app.listen({ port: options.port, host: options.host });
    return;
  }
  const dir = dirname(socketPath);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const folder = await stat(dir);
  if ((folder.mode & 0o007) !== 0 || (folder.uid !== process.getuid?.() && folder.uid !== 0)) {
    throw new ConfigError(
      `Invalid configuration: the folder of the socket ${socketPath} must be closed to other users (mode 0700, or 0750 with the proxy's group) and owned by this user, not mode ${(folder.mode & 0o777).toString(8)} owned by uid ${folder.uid}: anyone who can connect to it passes for the proxy`,
    );
  }
  const existing = await lstat(socketPath).catch(() => undefined);
  if (existing && !existing.isSocket())
    throw new ConfigError(`Invalid configuration: ${socketPath} exists and is not a socket`);
  if (await isServing(socketPath)) throw new Error(`${socketPath} is in use by another process`);
  // A socket file left by a process that crashed.
  await rm(socketPath, { force: true });
  const socketServer = createServer((socket) => {
    Object.defineProperty(socket, 'remoteAddress', { value: UNIX_SOCKET_PEER });
    app.server.emit('connection', socket);
  });
  // Stop accepting on the socket when the app starts to close, as the TCP listener does.
  app.addHook('preClose', (done) => {
    socketServer.close();
    done();
  });
  await app.listen({ port: options.port, host: options.host });
  await new Promise<void>((done, fail) => socketServer.once('error', fail).listen(socketPath, done));
  await chmod(socketPath, 0o660);
  sockets.set(app, socketPath);
}

/** Whether a process accepts connections on the Unix socket `socketPath`. */
export async function isServing(socketPath: string): Promise<boolean> {
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
