import createError from '@fastify/error';

// B's error catalogue (README, "Download server (B)" and "Error codes"). Clients see the code; logs see the cause.

/** Base of every catalogue error; anything else reaching the error handler is hidden as 500. */
export class DownloadError extends Error {}

const define = <Args extends unknown[] = []>(code: string, message: string, status: number) =>
  createError<[...Args, ErrorOptions?]>(code, message, status, DownloadError as ErrorConstructor);

export const TokenMalformed = define<[string]>('TOKEN_MALFORMED', '%s', 400);
export const TokenInvalid = define('TOKEN_INVALID', 'Download token is not valid', 403);
export const TokenExpired = define('TOKEN_EXPIRED', 'Download token has expired; get a new link', 403);
export const TokenUsed = define('TOKEN_USED', 'Download token was already used; get a new link', 410);
export const FileNotFound = define('FILE_NOT_FOUND', 'The file no longer exists', 404);
export const NotFound = define('NOT_FOUND', 'Not found', 404);
export const RangeNotSatisfiable = define('RANGE_NOT_SATISFIABLE', 'Requested range not satisfiable', 416);
export const ReplayStoreUnavailable = define(
  'REPLAY_STORE_UNAVAILABLE',
  'Cannot check the token right now; try again shortly',
  503,
);
export const KeysUnavailable = define(
  'KEYS_UNAVAILABLE',
  'Cannot verify tokens right now; try again shortly',
  503,
);
export const StorageUnavailable = define(
  'STORAGE_UNAVAILABLE',
  'Cannot read the file right now; try again shortly',
  503,
);
export const Internal = define('INTERNAL', 'Internal server error', 500);

/**
 * Marks a spent or expired token's error with its (verified) file and share ids, so the client
 * can renew: at the share page for a share token, else at A's download link for the file.
 */
export function renewable<E extends Error>(
  error: E,
  claims: { fid?: string | undefined; shr?: string | undefined } | undefined,
): E & { fileId?: string; shareId?: string } {
  return Object.assign(error, { fileId: claims?.fid, shareId: claims?.shr });
}
