import {
  ConfigError,
  type PublicUrls,
  parseEnv,
  publicUrls,
  SocketPath,
  s3Settings,
  sharedEnv,
  storageDir,
} from '@sfh/config';
import { type Static, Type } from '@sinclair/typebox';

export const DownloadEnv = Type.Object({
  ...sharedEnv,
  /** A Unix socket B listens on besides `DOWNLOAD_PORT`, for a proxy on the same host. */
  DOWNLOAD_SOCKET_PATH: SocketPath,
  /** Default: `APP_PUBLIC_URL/.well-known/jwks.json`. */
  JWKS_URL: Type.Optional(Type.String({ pattern: '^https?://\\S+$' })),
  /** Read keys from this file instead of `JWKS_URL` (a B that cannot reach A). */
  JWKS_FILE: Type.Optional(Type.String({ minLength: 1 })),
  JWKS_MAX_STALE_SECONDS: Type.Integer({ minimum: 0, default: 3600 }),
  TOKEN_MAX_AGE_SECONDS: Type.Integer({ minimum: 5, maximum: 3600, default: 300 }),
  CLOCK_TOLERANCE_SECONDS: Type.Integer({ minimum: 0, maximum: 300, default: 5 }),
  /** Replay store shared by B replicas; unset: in memory, journalled in DATA_DIR/replay. */
  REDIS_URL: Type.Optional(Type.String({ pattern: '^rediss?://' })),
  REDIS_KEY_PREFIX: Type.String({ default: 'dl:jti:', minLength: 1 }),
  /** Longest B waits for Redis before it answers 503 REPLAY_STORE_UNAVAILABLE. */
  REDIS_TIMEOUT_MS: Type.Integer({ minimum: 10, maximum: 60_000, default: 1000 }),
  /** B refuses to start on a Redis that may evict its keys (used tokens forgotten), unless this is true. */
  REDIS_ALLOW_EVICTION: Type.Boolean({ default: false }),
  /**
   * Bytes before an interrupted response's last written byte that a later request with the same
   * token may get again (what the kernel buffered but the client never got). At least 64 KiB: with
   * less, a resume after a kill would find its first bytes refused as already sent.
   */
  RESEND_MARGIN_BYTES: Type.Integer({ minimum: 65_536, maximum: 1_073_741_824, default: 16_777_216 }),
});

export type DownloadConfig = Omit<Static<typeof DownloadEnv>, keyof PublicUrls> &
  PublicUrls & {
    storageDir: string;
    /** The bucket holding the file bytes; `undefined`: `storageDir` on local disk. */
    s3: ReturnType<typeof s3Settings>;
    /** Where the key set comes from: an http(s) URL or a file path. */
    jwksSource: { url: string } | { file: string };
  };

/** Validates B's environment; throws `ConfigError` naming the variable. */
export function loadConfig(env: Record<string, string | undefined>): DownloadConfig {
  const parsed = parseEnv(DownloadEnv, env);
  const urls = publicUrls(parsed);
  if (parsed.JWKS_URL && parsed.JWKS_FILE) {
    throw new ConfigError('Invalid configuration: set JWKS_URL or JWKS_FILE, not both');
  }
  return {
    ...parsed,
    ...urls,
    storageDir: storageDir(parsed),
    s3: s3Settings(parsed),
    jwksSource: parsed.JWKS_FILE
      ? { file: parsed.JWKS_FILE }
      : { url: parsed.JWKS_URL ?? `${urls.APP_PUBLIC_URL}/.well-known/jwks.json` },
  };
}
