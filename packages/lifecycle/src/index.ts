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
}
