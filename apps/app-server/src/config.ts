import { ConfigError, Port, parseEnv, sharedEnv, storageDir } from '@sfh/config';
import { type Static, Type } from '@sinclair/typebox';

const GiB = 1024 ** 3;

export const AppEnv = Type.Object({
  ...sharedEnv,
  APP_PORT: Port(3000),
  /** Unset: embedded PGlite in `DATA_DIR/pg` (server.ts fills this in before building the app). */
  DATABASE_URL: Type.Optional(Type.String({ pattern: '^postgres(ql)?://' })),
  DATABASE_POOL_MAX: Type.Integer({ minimum: 1, maximum: 100, default: 10 }),
  TOKEN_TTL_SECONDS: Type.Integer({ minimum: 5, maximum: 600, default: 60 }),
  /** Comma-separated; the first signs cookies, all verify them (rotation). */
  SESSION_SECRET: Type.Optional(Type.String({ pattern: '^[^,]{32,}(,[^,]{32,})*$' })),
  SESSION_MAX_AGE_SECONDS: Type.Integer({ minimum: 60, default: 7 * 24 * 3600 }),
  MAX_UPLOAD_BYTES: Type.Integer({ minimum: 1, default: GiB }),
  TRUST_PROXY: Type.Boolean({ default: false }),
  // argon2id cost. The defaults are OWASP's minimum for argon2id; tests lower them through config.
  ARGON2_MEMORY_KIB: Type.Integer({ minimum: 8, default: 19456 }),
  ARGON2_TIME_COST: Type.Integer({ minimum: 1, default: 2 }),
});

export type AppConfig = Static<typeof AppEnv> & {
  /** Absolute path of the object store. */
  storageDir: string;
};

/** Validates A's environment; throws `ConfigError` naming the variable. */
export function loadConfig(env: Record<string, string | undefined>): AppConfig {
  const parsed = parseEnv(AppEnv, env);
  if (parsed.NODE_ENV === 'production' && !parsed.SESSION_SECRET) {
    throw new ConfigError('Invalid configuration: SESSION_SECRET is required when NODE_ENV=production');
  }
  return { ...parsed, storageDir: storageDir(parsed) };
}
