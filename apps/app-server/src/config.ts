import { isIP } from 'node:net';
import {
  ConfigError,
  type PublicUrls,
  parseEnv,
  publicUrls,
  SocketPath,
  s3Settings,
  sharedEnv,
  storageDir,
  UNIX_SOCKET_PEER,
} from '@sfh/config';
import { type Static, Type } from '@sinclair/typebox';
import type { KeyPolicy } from './keys/lifecycle.ts';

const GiB = 1024 ** 3;

export const AppEnv = Type.Object({
  ...sharedEnv,
  /** A Unix socket A listens on besides `APP_PORT`, for a proxy on the same host (README "Configuration"). */
  APP_SOCKET_PATH: SocketPath,
  /** Unset: embedded PGlite in `DATA_DIR/pg` (server.ts fills this in before building the app). */
  DATABASE_URL: Type.Optional(Type.String({ pattern: '^postgres(ql)?://' })),
  DATABASE_POOL_MAX: Type.Integer({ minimum: 1, maximum: 100, default: 10 }),
  TOKEN_TTL_SECONDS: Type.Integer({ minimum: 5, maximum: 600, default: 60 }),
  /** Download tokens a user may mint per minute, counted across replicas; 0: no limit. */
  MINT_RATE_PER_MINUTE: Type.Integer({ minimum: 0, default: 600 }),
  // Share links. What the public does through a link is counted apart from its owner's own limits.
  /** Downloads one share link may mint per minute, across replicas; 0: no limit. */
  SHARE_MINT_RATE_PER_MINUTE: Type.Integer({ minimum: 0, maximum: 1_000_000, default: 60 }),
  /** Downloads all of one user's share links together may mint per minute, across replicas; 0: no limit. */
  SHARE_MINT_RATE_PER_OWNER_PER_MINUTE: Type.Integer({ minimum: 0, maximum: 1_000_000, default: 600 }),
  /** Download posts (form and JSON) one client IP may make to share links per minute, per replica. */
  SHARE_DOWNLOADS_PER_IP_PER_MINUTE: Type.Integer({ minimum: 1, maximum: 10_000, default: 20 }),
  /** Wrong passwords for one share from one client IP within LOGIN_WINDOW_SECONDS → 429 for that IP. */
  SHARE_PASSWORD_MAX_FAILURES_PER_IP: Type.Integer({ minimum: 1, maximum: 1000, default: 5 }),
  /** Wrong passwords for one share from all addresses within LOGIN_WINDOW_SECONDS → 429 for everyone. */
  SHARE_PASSWORD_MAX_FAILURES_PER_SHARE: Type.Integer({ minimum: 1, maximum: 100_000, default: 100 }),
  /** Shares one user may create per hour, across replicas. */
  SHARE_CREATIONS_PER_USER_PER_HOUR: Type.Integer({ minimum: 1, maximum: 100_000, default: 60 }),
  /** Shares all users together may create from one client IP per hour, across replicas. */
  SHARE_CREATIONS_PER_IP_PER_HOUR: Type.Integer({ minimum: 1, maximum: 100_000, default: 120 }),
  /** Live shares (not revoked, not expired, downloads left) a user may have. */
  MAX_LIVE_SHARES_PER_USER: Type.Integer({ minimum: 1, maximum: 1_000_000, default: 500 }),
  /** Live shares one file may have. */
  MAX_LIVE_SHARES_PER_FILE: Type.Integer({ minimum: 1, maximum: 1_000_000, default: 50 }),
  /** Comma-separated; the first signs cookies, all verify them (rotation). */
  SESSION_SECRET: Type.Optional(Type.String({ pattern: '^[^,]{32,}(,[^,]{32,})*$' })),
  /** 32 random bytes, base64url: encrypts the private signing keys at rest. */
  KEY_ENCRYPTION_KEY: Type.Optional(Type.String({ pattern: '^[A-Za-z0-9_-]{43}$' })),
  /** Scheduled rotation: a new key every this many days (0: only by hand). */
  KEY_ROTATION_DAYS: Type.Number({ minimum: 0, default: 30 }),
  /** A session unused this long is over (sign in again). */
  SESSION_IDLE_TIMEOUT_SECONDS: Type.Integer({ minimum: 60, default: 24 * 3600 }),
  /** A session is over this long after sign-in, however active. */
  SESSION_ABSOLUTE_TIMEOUT_SECONDS: Type.Integer({ minimum: 60, default: 14 * 24 * 3600 }),
  /** Sign-in throttling: this many failures per account, or per client IP, within the window → 429. */
  LOGIN_MAX_FAILURES_PER_ACCOUNT: Type.Integer({ minimum: 1, default: 5 }),
  LOGIN_MAX_FAILURES_PER_IP: Type.Integer({ minimum: 1, default: 50 }),
  LOGIN_WINDOW_SECONDS: Type.Integer({ minimum: 1, default: 15 * 60 }),
  /** Registrations from one client IP per hour, counted across replicas; 0: no limit. */
  REGISTRATIONS_PER_IP_PER_HOUR: Type.Integer({ minimum: 0, default: 60 }),
  MAX_UPLOAD_BYTES: Type.Integer({ minimum: 1, default: GiB }),
  /** The longest an upload may take, head to last byte (1 GiB at about 300 kB/s). */
  UPLOAD_TIMEOUT_SECONDS: Type.Integer({ minimum: 1, maximum: 86_400, default: 3600 }),
  /** Bytes a user may store in all; 0: no quota. */
  USER_QUOTA_BYTES: Type.Integer({ minimum: 0, default: 10 * GiB }),
  /** Objects whose deletion failed (the bucket was down) are retried this often, backing off. */
  OBJECT_DELETE_RETRY_SECONDS: Type.Integer({ minimum: 1, maximum: 3600, default: 30 }),
  /**
   * Whose `X-Forwarded-*` A believes: `false`; the proxies' addresses or CIDR ranges, comma
   * separated (proxy-addr's `loopback`, `linklocal`, `uniquelocal` too, and `unix`: the peers on
   * `APP_SOCKET_PATH`); or the number of proxies in front of A. Never "everyone" (`true`): a
   * client reaching A directly would pick its own IP.
   */
  TRUST_PROXY: Type.String({ default: 'false', minLength: 1 }),
  // argon2id cost. The defaults are OWASP's minimum for argon2id; tests lower them through config.
  ARGON2_MEMORY_KIB: Type.Integer({ minimum: 8, default: 19456 }),
  ARGON2_TIME_COST: Type.Integer({ minimum: 1, default: 2 }),
  /**
   * argon2 hashes and verifications running at once in this process. They run on libuv's thread
   * pool (4 threads unless UV_THREADPOOL_SIZE says otherwise), which token signing and file I/O
   * share, and each keeps a core busy: keep this below both. One is about 100 sign-ins a second
   * at the default cost.
   */
  ARGON2_CONCURRENCY: Type.Integer({ minimum: 1, maximum: 64, default: 1 }),
  /** argon2 work that may wait for a turn; past it a request gets 503 BUSY with Retry-After. */
  ARGON2_QUEUE_MAX: Type.Integer({ minimum: 0, maximum: 10_000, default: 32 }),
});

export type AppConfig = Omit<Static<typeof AppEnv>, keyof PublicUrls> &
  PublicUrls & {
    /** Absolute path of the object store. */
    storageDir: string;
    /** The bucket holding the file bytes; `undefined`: `storageDir` on local disk. */
    s3: ReturnType<typeof s3Settings>;
    /** `KEY_ENCRYPTION_KEY` decoded. */
    kek: Buffer | undefined;
    keyPolicy: KeyPolicy;
    /** `TRUST_PROXY` as fastify's `trustProxy` takes it (a hop count as proxy-addr's function). */
    trustProxy: false | string[] | ((address: string, hop: number) => boolean);
  };

const PROXY_NAMES = new Set(['loopback', 'linklocal', 'uniquelocal']);

function parseTrustProxy(value: string): AppConfig['trustProxy'] {
  if (value === 'false') return false;
  if (/^\d+$/.test(value)) {
    const hops = Number(value);
    return (_address, hop) => hop < hops;
  }
  const entries = value.split(',').map((entry) => entry.trim());
  const valid = (entry: string) => {
    if (PROXY_NAMES.has(entry) || entry === 'unix') return true;
    const [address = '', prefix, ...rest] = entry.split('/');
    const family = isIP(address);
    const bits = family === 4 ? 32 : 128;
    return (
      family !== 0 &&
      rest.length === 0 &&
      (prefix === undefined || (/^\d+$/.test(prefix) && Number(prefix) <= bits))
    );
  };
  if (value === 'true' || !entries.every(valid)) {
    throw new ConfigError(
      `Invalid configuration: TRUST_PROXY must be false, the addresses of A's proxies (such as 127.0.0.1 or 10.0.0.0/8, comma separated; or loopback, linklocal, uniquelocal, unix) or their number, not ${JSON.stringify(value)}: true would trust X-Forwarded-For from any client that reaches A directly`,
    );
  }
  // The socket's peers all have this address, which no TCP peer can have.
  return entries.map((entry) => (entry === 'unix' ? UNIX_SOCKET_PEER : entry));
}

// A retired key stays published this much longer than its last token can live: room for
// replicas that still signed with it for a poll interval, and for B's clock tolerance.
const KEY_RETENTION_MARGIN_SECONDS = 60;

/** Validates A's environment; throws `ConfigError` naming the variable. */
export function loadConfig(env: Record<string, string | undefined>): AppConfig {
  const parsed = parseEnv(AppEnv, env);
  if (parsed.NODE_ENV === 'production') {
    for (const name of ['SESSION_SECRET', 'KEY_ENCRYPTION_KEY'] as const) {
      if (!parsed[name])
        throw new ConfigError(`Invalid configuration: ${name} is required when NODE_ENV=production`);
    }
  }
  return {
    ...parsed,
    ...publicUrls(parsed),
    storageDir: storageDir(parsed),
    s3: s3Settings(parsed),
    kek: parsed.KEY_ENCRYPTION_KEY ? Buffer.from(parsed.KEY_ENCRYPTION_KEY, 'base64url') : undefined,
    trustProxy: parseTrustProxy(parsed.TRUST_PROXY),
    keyPolicy: {
      // One B refresh, plus one more for a cache honouring the JWKS max-age in between.
      activationDelayMs: 2 * parsed.JWKS_REFRESH_SECONDS * 1000,
      retentionMs: (parsed.TOKEN_TTL_SECONDS + KEY_RETENTION_MARGIN_SECONDS) * 1000,
      rotationIntervalMs: parsed.KEY_ROTATION_DAYS * 24 * 3600 * 1000,
    },
  };
}
