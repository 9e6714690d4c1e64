import fp from 'fastify-plugin';
import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';

declare module 'fastify' {
  interface FastifyInstance {
    metrics: {
      /** Counts one download request by its outcome (`ok`, `partial`, `head`, `aborted`, or an error code). */
      download(result: string, bytes: number): void;
      /** Counts a reserve refused by the replay store, by cause (`overlap`, `bytes`, `responses`). */
      refused(cause: string): void;
      /** Counts a release after an interrupted response, and the written bytes it gives back. */
      released(resendable: number): void;
    };
  }
}

const TOKEN_REJECTIONS: Record<string, string> = {
  TOKEN_MALFORMED: 'malformed',
  TOKEN_INVALID: 'invalid',
  TOKEN_EXPIRED: 'expired',
  TOKEN_USED: 'used',
};

/**
 * Prometheus metrics at `GET /metrics`: downloads by result, bytes sent, token rejections by
 * reason, replay-store refusals by cause, releases and the bytes they make sendable again, the key set's age and size, and the process's own (memory, descriptors, event loop).
 * A registry per app, so tests can build several.
 */
export default fp(
  async (app) => {
    const registry = new Registry();
    collectDefaultMetrics({ register: registry });
    const downloads = new Counter({
      name: 'download_requests_total',
      help: 'Download requests by result: ok, partial, head, aborted (the client went away), or the error code',
      labelNames: ['result'],
      registers: [registry],
    });
    const bytes = new Counter({
      name: 'download_bytes_sent_total',
      help: 'Bytes written to download clients (headers included)',
      registers: [registry],
    });
    const rejections = new Counter({
      name: 'download_token_rejections_total',
      help: 'Tokens refused, by reason: malformed, invalid, expired, used',
      labelNames: ['reason'],
      registers: [registry],
    });
    const refusals = new Counter({
      name: 'download_refusals_total',
      help: 'Requests refused 410 TOKEN_USED by the replay store, by cause: overlap (bytes already sent or in flight), bytes or responses (a bound reached)',
      labelNames: ['cause'],
      registers: [registry],
    });
    const releases = new Counter({
      name: 'download_releases_total',
      help: 'Interrupted responses whose unsent bytes were released for a later request with the same token',
      registers: [registry],
    });
    const resendable = new Counter({
      name: 'download_resend_margin_bytes_total',
      help: 'Bytes written to clients that went away, released again under RESEND_MARGIN_BYTES: the most that can be sent twice',
      registers: [registry],
    });
    new Gauge({
      name: 'jwks_age_seconds',
      help: 'Seconds since the key set was last read successfully (-1: never)',
      registers: [registry],
      collect() {
        const { fetchedAt } = app.keys.status();
        this.set(fetchedAt ? (Date.now() - fetchedAt.getTime()) / 1000 : -1);
      },
    });
    new Gauge({
      name: 'jwks_keys',
      help: 'Keys in the current key set',
      registers: [registry],
      collect() {
        this.set(app.keys.status().keys);
      },
    });
    new Gauge({
      name: 'jwks_keys_skipped',
      help: 'Entries of the key set that claim to be signing keys but cannot be used (logged when read)',
      registers: [registry],
      collect() {
        this.set(app.keys.status().skipped);
      },
    });
    new Gauge({
      name: 'jwks_stale',
      help: '1 while the last read of the key set failed and B serves on its last good set',
      registers: [registry],
      collect() {
        this.set(app.keys.status().stale ? 1 : 0);
      },
    });
    new Gauge({
      name: 'jwks_usable',
      help: '1 while the key set is fresh enough to verify tokens, 0 when B fails closed',
      registers: [registry],
      collect() {
        this.set(app.keys.status().usable ? 1 : 0);
      },
    });

    app.decorate('metrics', {
      download(result: string, sent: number) {
        downloads.inc({ result });
        bytes.inc(sent);
        const reason = TOKEN_REJECTIONS[result];
        if (reason) rejections.inc({ reason });
      },
      refused(cause: string) {
        refusals.inc({ cause });
      },
      released(bytes: number) {
        releases.inc();
        resendable.inc(bytes);
      },
    });

    app.get('/metrics', async (_request, reply) => {
      reply.header('content-type', registry.contentType);
      return registry.metrics();
    });
  },
  { name: 'metrics', dependencies: ['keys'] },
);
