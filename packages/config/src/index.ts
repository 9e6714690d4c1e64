import { join, resolve } from 'node:path';
import { type Static, type TObject, type TProperties, Type } from '@sinclair/typebox';
import { envSchema } from 'env-schema';

/** Thrown when the environment does not satisfy a schema; the message names the variable. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

/**
 * Validates `env` against a TypeBox object schema: strings are coerced to the declared types,
 * defaults are applied, unknown variables are ignored. Never reads `process.env` itself.
 */
export function parseEnv<P extends TProperties>(schema: TObject<P>, env: Record<string, string | undefined>) {
  // Empty strings count as unset, so `FOO= npm start` falls back to the default like a shell user expects.
  const data = Object.fromEntries(
    Object.entries(env).filter(([, value]) => value !== undefined && value !== ''),
  );
  try {
    return envSchema<Static<TObject<P>>>({ schema, data, env: false, dotenv: false });
  } catch (error) {
    const text = error instanceof Error ? error.message : String(error);
    throw new ConfigError(`Invalid configuration: ${text.replaceAll('env/', '')}`, { cause: error });
  }
}

/** A TCP port number (0 lets the OS choose, which tests use). */
export const Port = (defaultPort: number) =>
  Type.Integer({ minimum: 0, maximum: 65535, default: defaultPort });

/**
 * A Unix socket a server listens on besides its TCP port (unset: none). An absolute path of at
 * most 100 bytes (the kernel's limit is 107); its folder must be closed to other users.
 */
export const SocketPath = Type.Optional(
  Type.String({
    pattern: '^/',
    maxLength: 100,
    description: 'Unix socket to listen on as well (unset: TCP only)',
  }),
);

/**
 * The address a peer on a server's Unix socket has (`request.socket.remoteAddress`, so
 * `request.ip` when no trusted proxy says otherwise). No TCP peer can have it, so trusting it
 * (A's `TRUST_PROXY=unix`) trusts the socket's peers and no one else.
 */
export const UNIX_SOCKET_PEER = '0.0.0.0';

/**
 * An absolute http(s) origin, optionally with a path prefix for a server behind a proxy that
 * strips it (`https://cdn.example.com/dl`); no trailing slash, query or fragment.
 */
const PublicUrl = Type.Optional(Type.String({ pattern: '^https?://[^/?#\\s]+(/[^/?#\\s]+)*$' }));

/** Settings both servers read, with the names and defaults of the design. */
export const sharedEnv = {
  NODE_ENV: Type.Union([Type.Literal('development'), Type.Literal('production'), Type.Literal('test')], {
    default: 'development',
  }),
  HOST: Type.String({ default: '127.0.0.1', minLength: 1 }),
  DATA_DIR: Type.String({ default: './data', minLength: 1 }),
  STORAGE_DIR: Type.Optional(Type.String({ minLength: 1 })),
  /** Set: file bytes live in this S3 bucket (connection settings: the AWS SDK's own AWS_* variables). */
  S3_BUCKET: Type.Optional(Type.String({ pattern: '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$' })),
  S3_PREFIX: Type.String({ default: '', pattern: '^[^\\s]*$' }),
  S3_FORCE_PATH_STYLE: Type.Boolean({ default: false }),
  /** Longest one call to the bucket may take to connect and to answer (then 503 STORAGE_UNAVAILABLE). */
  S3_TIMEOUT_MS: Type.Integer({ minimum: 100, maximum: 120_000, default: 10_000 }),
  // Both servers know both ports: an unset public URL defaults to its server's port.
  APP_PORT: Port(3000),
  DOWNLOAD_PORT: Port(3001),
  APP_PUBLIC_URL: PublicUrl,
  DOWNLOAD_PUBLIC_URL: PublicUrl,
  JWKS_REFRESH_SECONDS: Type.Integer({ minimum: 1, maximum: 3600, default: 60 }),
  SHUTDOWN_GRACE_SECONDS: Type.Integer({ minimum: 0, maximum: 3600, default: 30 }),
  /** Time a client has to send its request head (and on A a body that is not an upload); stops slowloris clients. */
  REQUEST_TIMEOUT_SECONDS: Type.Integer({ minimum: 1, maximum: 600, default: 30 }),
  /**
   * A connection with no traffic either way for this long is closed; a transfer that keeps
   * moving never is. (Node lets one timeout pass while a write is pending, so a stalled transfer
   * is cut after up to twice this.)
   */
  IDLE_TIMEOUT_SECONDS: Type.Integer({ minimum: 1, maximum: 3600, default: 60 }),
  LOG_LEVEL: Type.Union(
    ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((level) => Type.Literal(level)),
    { default: 'info' },
  ),
  /** `json`: one JSON object per line (for log collectors); `pretty`: readable lines for a terminal. */
  LOG_FORMAT: Type.Union([Type.Literal('json'), Type.Literal('pretty')], { default: 'json' }),
};

/**
 * The AWS SDK's own environment variables (the AWS SDKs and Tools reference, "Environment
 * variables"), which the config leaves to the SDK: region, endpoint, the default credential
 * chain, retries. A server that keeps its bytes in a bucket reads these besides its schema.
 */
export const AWS_SDK_ENV = [
  'AWS_REGION',
  'AWS_ENDPOINT_URL',
  'AWS_ENDPOINT_URL_S3',
  'AWS_ACCESS_KEY_ID',
  'AWS_SECRET_ACCESS_KEY',
  'AWS_SESSION_TOKEN',
  'AWS_PROFILE',
  'AWS_CONFIG_FILE',
  'AWS_SHARED_CREDENTIALS_FILE',
  'AWS_ROLE_ARN',
  'AWS_ROLE_SESSION_NAME',
  'AWS_WEB_IDENTITY_TOKEN_FILE',
  'AWS_CONTAINER_CREDENTIALS_FULL_URI',
  'AWS_CONTAINER_CREDENTIALS_RELATIVE_URI',
  'AWS_CONTAINER_AUTHORIZATION_TOKEN',
  'AWS_CA_BUNDLE',
  'AWS_MAX_ATTEMPTS',
  'AWS_RETRY_MODE',
  'AWS_EC2_METADATA_DISABLED',
  'AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED',
] as const;

/** `STORAGE_DIR`, defaulting to `DATA_DIR/files`, as an absolute path. */
export function storageDir(env: { DATA_DIR: string; STORAGE_DIR?: string | undefined }): string {
  return resolve(env.STORAGE_DIR ?? join(env.DATA_DIR, 'files'));
}

/** The bucket settings when `S3_BUCKET` is set; `undefined`: local disk. */
export function s3Settings(env: {
  S3_BUCKET?: string | undefined;
  S3_PREFIX: string;
  S3_FORCE_PATH_STYLE: boolean;
  S3_TIMEOUT_MS: number;
}) {
  if (!env.S3_BUCKET) return undefined;
  return {
    bucket: env.S3_BUCKET,
    prefix: env.S3_PREFIX,
    forcePathStyle: env.S3_FORCE_PATH_STYLE,
    timeoutMs: env.S3_TIMEOUT_MS,
  };
}

/** A's and B's public URLs, the token's issuer and audience, once defaults are applied. */
export interface PublicUrls {
  APP_PUBLIC_URL: string;
  DOWNLOAD_PUBLIC_URL: string;
}

/**
 * An unset public URL is `http://localhost:<port>` of its server, so changing only `APP_PORT` or
 * `DOWNLOAD_PORT` keeps A's links and B's key source pointing at the right ports.
 */
export function publicUrls(env: {
  APP_PORT: number;
  DOWNLOAD_PORT: number;
  APP_PUBLIC_URL?: string | undefined;
  DOWNLOAD_PUBLIC_URL?: string | undefined;
}): PublicUrls {
  return {
    APP_PUBLIC_URL: env.APP_PUBLIC_URL ?? `http://localhost:${env.APP_PORT}`,
    DOWNLOAD_PUBLIC_URL: env.DOWNLOAD_PUBLIC_URL ?? `http://localhost:${env.DOWNLOAD_PORT}`,
  };
}
