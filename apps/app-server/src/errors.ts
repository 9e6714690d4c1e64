import createError from '@fastify/error';

// A's error catalogue: the codes clients see (README, "App server (A)" and "Error codes"). Library errors are
// wrapped with `{ cause }` so logs keep the detail while clients get only the code.

/** Base of every catalogue error; anything else reaching the error handler is mapped or hidden. */
export class AppError extends Error {}

const define = <Args extends unknown[] = []>(code: string, message: string, status: number) =>
  createError<[...Args, ErrorOptions?]>(code, message, status, AppError as ErrorConstructor);

export const ValidationFailed = define<[string]>('VALIDATION_FAILED', '%s', 400);
export const Unauthenticated = define('UNAUTHENTICATED', 'Sign in first', 401);
export const InvalidCredentials = define('INVALID_CREDENTIALS', 'Wrong username or password', 401);
export const CsrfInvalid = define('CSRF_INVALID', 'Missing or invalid CSRF token', 403);
export const NotFound = define('NOT_FOUND', 'Not found', 404);
export const ShareExpired = define(
  'SHARE_EXPIRED',
  'This share link has expired or has no downloads left',
  410,
);
export const UsernameTaken = define('USERNAME_TAKEN', 'That username is taken', 409);
export const FileTooLarge = define<[number]>(
  'FILE_TOO_LARGE',
  'The file is larger than the limit of %d bytes',
  413,
);
export const QuotaExceeded = define<[number]>(
  'QUOTA_EXCEEDED',
  'This upload would exceed your storage quota of %d bytes',
  413,
);
export const RateLimited = define<[number]>(
  'RATE_LIMITED',
  'Too many attempts; try again in %d seconds',
  429,
);
export const TooManyShares = define<[number, string]>(
  'TOO_MANY_SHARES',
  'There are already %d live share links %s; revoke one first',
  409,
);
// Password hashing is bounded (ARGON2_CONCURRENCY, ARGON2_QUEUE_MAX): past the bound the server
// sheds the request rather than queue it behind work it cannot do in time. Not RATE_LIMITED:
// the client did nothing wrong, and a retry shortly after may well succeed.
export const Busy = define('BUSY', 'The server is busy; try again in a few seconds', 503);
export const DatabaseUnavailable = define(
  'DATABASE_UNAVAILABLE',
  'The database is unavailable; try again shortly',
  503,
);
export const StorageUnavailable = define(
  'STORAGE_UNAVAILABLE',
  'File storage is unavailable; try again shortly',
  503,
);
export const InsufficientStorage = define('INSUFFICIENT_STORAGE', 'The server is out of storage space', 507);
export const Internal = define('INTERNAL', 'Internal server error', 500);

// Connection-level failures of pg (and of the embedded database's socket): the database is
// down or unreachable, which the client should hear as 503, not 500.
const DATABASE_DOWN = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOENT',
  'ETIMEDOUT',
  'EPIPE',
  '57P01',
  '57P03',
  '08000',
  '08001',
  '08003',
  '08006',
]);

/** Whether `error` says the database is down or unreachable (rather than refusing a statement). */
export const isDatabaseDown = (error: { code?: string; message: string }) =>
  DATABASE_DOWN.has(error.code ?? '') ||
  /Connection terminated|timeout exceeded when trying to connect|Query read timeout/.test(error.message);

/** A database failure as the catalogue error a client may see; the original is its cause. */
export const fromDatabaseError = (error: unknown) =>
  error instanceof Error && isDatabaseDown(error)
    ? new DatabaseUnavailable({ cause: error })
    : new Internal({ cause: error });
