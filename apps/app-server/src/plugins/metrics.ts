import fp from 'fastify-plugin';
import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';

declare module 'fastify' {
  interface FastifyInstance {
    /** A's counters for `/metrics` (B's app has its own `metrics`: one type per name). */
    stats: {
      /** A download token minted: through a signed-in session, or a share link. */
      tokenMinted(kind: 'session' | 'share'): void;
      signIn(outcome: 'ok' | 'invalid_credentials' | 'throttled'): void;
      /** A request refused with 429 by one of A's limits. */
      throttled(
        limit: 'sign_in' | 'mint' | 'share_mint' | 'share_password' | 'share_ip' | 'share_create',
      ): void;
      /** An upload stored and recorded, with its size. */
      upload(bytes: number): void;
      /** A request answered 503 `DATABASE_UNAVAILABLE`. */
      databaseUnavailable(): void;
      /** This replica started signing with another key. */
      signingKeySwitched(): void;
    };
  }
}

/**
 * Prometheus metrics at `GET /metrics`, for the internal network like B's: tokens minted by
 * kind, sign-ins by outcome, throttled requests, active sessions, uploads and bytes, the
 * database pool and its errors, the signing keys by state and key switches, and the process's
 * own (memory, descriptors, event loop). A registry per app, so tests can build several.
 */
export default fp(
  async (app, options: { sessionIdleSeconds: number }) => {
    const registry = new Registry();
    const registers = [registry];
    collectDefaultMetrics({ register: registry });
    const minted = new Counter({
      name: 'tokens_minted_total',
      help: 'Download tokens minted, by kind: session, share',
      labelNames: ['kind'],
      registers,
    });
    const signIns = new Counter({
      name: 'sign_ins_total',
      help: 'Sign-in attempts by outcome: ok, invalid_credentials, throttled',
      labelNames: ['outcome'],
      registers,
    });
    const throttled = new Counter({
      name: 'throttled_requests_total',
      help: 'Requests refused with 429, by limit: sign_in, mint, share_mint, share_password, share_ip, share_create',
      labelNames: ['limit'],
      registers,
    });
    const uploads = new Counter({ name: 'uploads_total', help: 'Files uploaded and recorded', registers });
    const uploadBytes = new Counter({
      name: 'upload_bytes_received_total',
      help: 'Bytes of the files uploaded and recorded',
      registers,
    });
    const dbErrors = new Counter({
      name: 'database_errors_total',
      help: 'Database failures, by kind: unavailable (a request answered 503), idle_connection (the pool lost one)',
      labelNames: ['kind'],
      registers,
    });
    app.db.on('error', () => dbErrors.inc({ kind: 'idle_connection' }));
    // The series read from the database keep their last value while it is down: /metrics must
    // answer then most of all (database_errors_total and the pool say what is going on).
    const fromDatabase = async (read: () => Promise<void>) => {
      await read().catch((error: unknown) => app.log.debug({ err: error }, 'metrics: database unavailable'));
    };
    const keySwitches = new Counter({
      name: 'signing_key_switches_total',
      help: 'Times this replica started signing with another key (start, rotation, revocation)',
      registers,
    });
    new Gauge({
      name: 'database_pool_connections',
      help: "Connections in A's pool, by state: total, idle, waiting (clients queued for one)",
      labelNames: ['state'],
      registers,
      collect() {
        this.set({ state: 'total' }, app.db.totalCount);
        this.set({ state: 'idle' }, app.db.idleCount);
        this.set({ state: 'waiting' }, app.db.waitingCount);
      },
    });
    new Gauge({
      name: 'sessions_active',
      help: 'Signed-in sessions alive: not ended, not past their idle or absolute timeout',
      registers,
      async collect() {
        await fromDatabase(async () =>
          this.set(await app.repos.sessions.countSignedIn(options.sessionIdleSeconds)),
        );
      },
    });
    new Gauge({
      name: 'signing_keys',
      help: 'Signing keys by state: next, current, previous, revoked',
      labelNames: ['state'],
      registers,
      async collect() {
        await fromDatabase(async () => {
          const keys = await app.repos.signingKeys.list();
          for (const state of ['next', 'current', 'previous', 'revoked'])
            this.set({ state }, keys.filter((key) => key.state === state).length);
        });
      },
    });

    app.decorate('stats', {
      tokenMinted: (kind) => minted.inc({ kind }),
      signIn: (outcome) => signIns.inc({ outcome }),
      throttled: (limit) => throttled.inc({ limit }),
      upload(bytes) {
        uploads.inc();
        uploadBytes.inc(bytes);
      },
      databaseUnavailable: () => dbErrors.inc({ kind: 'unavailable' }),
      signingKeySwitched: () => keySwitches.inc(),
    });

    app.get('/metrics', { schema: { hide: true } }, async (_request, reply) => {
      reply.header('content-type', registry.contentType);
      return registry.metrics();
    });
  },
  { name: 'metrics', dependencies: ['db', 'repositories'] },
);
