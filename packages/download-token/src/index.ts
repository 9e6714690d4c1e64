/**
 * The download token: the one claim A makes to B. "The holder may download this one file, once,
 * within the next minute." Signed with jose's `SignJWT`, verified with jose's `jwtVerify`: token
 * handling belongs to a proven, widely reviewed implementation, not to this project. What is ours
 * is the contract around it: the claims, the options every verification names, the file claims
 * checked after jose accepts a token, and the mapping of jose's errors onto B's codes.
 * Pure functions: no I/O, no clocks but the one passed in.
 */
import {
  type CryptoKey,
  decodeJwt,
  decodeProtectedHeader,
  errors,
  type JWTPayload,
  jwtVerify,
  SignJWT,
} from 'jose';
import { nanoid } from 'nanoid';

/** `typ` header of every download token (RFC 8725 §3.11: explicit typing, so no other JWT fits). */
export const TOKEN_TYPE = 'dl+jwt';
/**
 * The asymmetric algorithms a download token may be signed with, so B can verify but never mint.
 * A key records its algorithm and the JWKS says it; B accepts a token only under the algorithm of
 * the key its `kid` names, and only algorithms of keys A publishes.
 */
export const TOKEN_ALGORITHMS = ['ES256', 'EdDSA'] as const;
export type TokenAlgorithm = (typeof TOKEN_ALGORITHMS)[number];
/**
 * The algorithm of every new signing key. ES256 verifies faster than EdDSA through jose here
 * (README, "Choosing the algorithm"); EdDSA keys made before keep working until they retire.
 */
export const TOKEN_ALGORITHM: TokenAlgorithm = 'ES256';
/** Longer tokens are refused before any parsing. Real ones stay well under 2 KB. */
export const MAX_TOKEN_LENGTH = 4096;
/** `nbf` is set this far before `iat`, so a B whose clock runs a little behind still accepts it. */
export const NOT_BEFORE_SKEW_SECONDS = 5;
/** File names longer than this are refused by A, which keeps tokens small. */
export const MAX_FILE_NAME_LENGTH = 255;

/** Whether `alg` is one a download token may be signed with. */
export const isTokenAlgorithm = (alg: unknown): alg is TokenAlgorithm =>
  TOKEN_ALGORITHMS.includes(alg as TokenAlgorithm);

/** What B needs to serve the file without looking anything up. */
export interface FileClaims {
  /** File id on A (used to send the browser back to A for a fresh token). */
  fid: string;
  /** Storage object id. */
  obj: string;
  /** Original file name, for Content-Disposition. */
  name: string;
  /** Content type as uploaded. */
  ctype: string;
  /** Size in bytes. */
  size: number;
  /** Lowercase hex SHA-256 of the content; B's strong ETag. */
  sha256: string;
  /**
   * The share link the token was minted through (then `sub` is `share:<shr>`), so a browser
   * whose token is spent goes back to the share page, never to the owner's signed-in routes.
   */
  shr?: string;
}

/** A verified download token's claims. */
export interface DownloadClaims extends FileClaims {
  iss: string;
  aud: string;
  sub: string;
  jti: string;
  iat: number;
  nbf: number;
  exp: number;
}

export type DownloadTokenErrorCode = 'TOKEN_MALFORMED' | 'TOKEN_INVALID' | 'TOKEN_EXPIRED';

/**
 * Why a token was refused. `claims` is set only when the signature was valid (an expired token),
 * so callers may trust it, for example to send a browser back to A for a fresh token.
 */
export class DownloadTokenError extends Error {
  override name = 'DownloadTokenError';
  /** The genuine claims of an expired token. */
  readonly claims: Partial<DownloadClaims> | undefined;
  /** The time claim that failed (`nbf`, `iat`) when a genuine token is from the future. */
  readonly claim: string | undefined;
  constructor(
    readonly code: DownloadTokenErrorCode,
    message: string,
    details: { claims?: Partial<DownloadClaims>; claim?: string; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.claims = details.claims;
    this.claim = details.claim;
  }
}

export interface SignOptions {
  /** The private key, imported once per key change (what A holds); its algorithm is the token's. */
  key: CryptoKey;
  kid: string;
  issuer: string;
  audience: string;
  /** The user the token is minted for. */
  subject: string;
  ttlSeconds: number;
  now?: Date;
}

export interface SignedToken {
  token: string;
  jti: string;
  expiresAt: Date;
}

/** Mints a single-use download token for `file` with jose's `SignJWT`. */
export async function signDownloadToken(file: FileClaims, options: SignOptions): Promise<SignedToken> {
  const alg = keyAlgorithm(options.key);
  if (options.key.type !== 'private' || !alg) {
    throw new TypeError(`Download tokens are signed with a private ${TOKEN_ALGORITHMS.join(' or ')} key`);
  }
  const iat = Math.floor((options.now ?? new Date()).getTime() / 1000);
  const exp = iat + options.ttlSeconds;
  const jti = nanoid();
  const token = await new SignJWT({ ...file })
    .setProtectedHeader({ alg, kid: options.kid, typ: TOKEN_TYPE })
    .setIssuer(options.issuer)
    .setAudience(options.audience)
    .setSubject(options.subject)
    .setJti(jti)
    .setIssuedAt(iat)
    .setNotBefore(iat - NOT_BEFORE_SKEW_SECONDS)
    .setExpirationTime(exp)
    .sign(options.key);
  return { token, jti, expiresAt: new Date(exp * 1000) };
}

/**
 * Returns the public key for a `kid` (imported once per key-set read, never per token), or
 * `undefined` if there is none. `alg` is the token's, already on the allowlist, for a resolver
 * that selects by both; the key's own algorithm is checked against it afterwards whatever the
 * resolver did. May refresh a key set (then it returns a promise; a key it has at hand it may
 * return as it is, which spares each verification a promise); any error it throws or rejects
 * with (keys unavailable) propagates unchanged from `verifyDownloadToken`.
 */
export type KeyResolver = (
  kid: string,
  alg: TokenAlgorithm,
) => CryptoKey | undefined | Promise<CryptoKey | undefined>;

export interface VerifyOptions {
  /** The allowlist: the algorithms of the keys A publishes (a subset of `TOKEN_ALGORITHMS`). */
  algorithms: readonly TokenAlgorithm[];
  issuer: string;
  audience: string;
  maxTokenAgeSeconds: number;
  clockToleranceSeconds: number;
  currentDate?: Date;
}

// The compact serialization's alphabet: three base64url segments without padding (RFC 7515 §7.1),
// the signature empty only for `alg: none`, which jose then refuses. jose decodes leniently
// (padding, whitespace), so this keeps one token from having several spellings.
const COMPACT = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
const MAX_KID_LENGTH = 128;
const REQUIRED_CLAIMS = ['exp', 'iat', 'nbf', 'jti', 'sub'];

/**
 * Verifies a download token with jose's `jwtVerify` and returns its claims, or throws
 * `DownloadTokenError`.
 *
 * Before jose: the length and the alphabet, and jose's own decoder, so a token whose header or
 * payload is not a JSON object is TOKEN_MALFORMED without a key lookup. jose then checks, in its
 * order: `crit`, the algorithm allowlist, the key (only from `getKey`, by `kid`: `jku`, `x5u`,
 * `jwk` are never looked at), the signature, `typ`, the required claims, `iss`, `aud`, `nbf` and
 * `iat` not in the future beyond the tolerance, `exp` and the maximum age (TOKEN_EXPIRED, with the
 * genuine claims). After jose: the file claims well formed.
 */
export async function verifyDownloadToken(
  token: string,
  getKey: KeyResolver,
  options: VerifyOptions,
): Promise<DownloadClaims> {
  if (token.length > MAX_TOKEN_LENGTH) {
    throw new DownloadTokenError('TOKEN_MALFORMED', `Token is longer than ${MAX_TOKEN_LENGTH} characters`);
  }
  if (!COMPACT.test(token)) {
    throw new DownloadTokenError('TOKEN_MALFORMED', 'Token is not a compact JWS (three base64url segments)');
  }
  try {
    decodeJwt(token);
  } catch (cause) {
    throw new DownloadTokenError('TOKEN_MALFORMED', 'Token payload is not a JSON object', { cause });
  }
  let payload: JWTPayload;
  try {
    ({ payload } = await jwtVerify(token, (header) => resolve(header.kid, header.alg, getKey), {
      algorithms: options.algorithms as TokenAlgorithm[],
      typ: TOKEN_TYPE,
      issuer: options.issuer,
      audience: options.audience,
      requiredClaims: REQUIRED_CLAIMS,
      maxTokenAge: options.maxTokenAgeSeconds,
      clockTolerance: options.clockToleranceSeconds,
      ...(options.currentDate && { currentDate: options.currentDate }),
    }));
  } catch (error) {
    throw toTokenError(error, token);
  }
  if (!hasDownloadClaims(payload)) {
    throw new DownloadTokenError('TOKEN_INVALID', 'Token is missing file claims or has malformed ones');
  }
  return payload;
}

/**
 * The key for a token's header, bound to its own algorithm: no key verifies under another.
 * Synchronous when the resolver is: jose awaits whatever this returns.
 */
function resolve(kid: unknown, alg: unknown, getKey: KeyResolver): CryptoKey | Promise<CryptoKey> {
  if (typeof kid !== 'string' || kid.length === 0 || kid.length > MAX_KID_LENGTH) {
    throw new DownloadTokenError('TOKEN_INVALID', 'Token has no usable key id');
  }
  // The resolver's own failure (keys unavailable) must not pass for an invalid token, even
  // when it is one of jose's errors (a JWKS fetch timeout).
  const failed = (error: unknown) => {
    throw new ResolverFailure(error);
  };
  let key: ReturnType<KeyResolver>;
  try {
    key = getKey(kid, alg as TokenAlgorithm);
  } catch (error) {
    failed(error);
  }
  return key instanceof Promise ? key.then((found) => boundKey(found, alg), failed) : boundKey(key, alg);
}

function boundKey(key: CryptoKey | undefined, alg: unknown): CryptoKey {
  if (!key) throw new DownloadTokenError('TOKEN_INVALID', 'Token was signed with an unknown key');
  if (keyAlgorithm(key) !== alg) {
    throw new DownloadTokenError('TOKEN_INVALID', 'Token algorithm is not the algorithm of its key');
  }
  return key;
}

/** The JWS algorithm a key is for, or `undefined` for keys of other algorithms. */
function keyAlgorithm(key: CryptoKey): TokenAlgorithm | undefined {
  const { name, namedCurve } = key.algorithm as { name: string; namedCurve?: string };
  if (name === 'Ed25519') return 'EdDSA';
  if (name === 'ECDSA' && namedCurve === 'P-256') return 'ES256';
  return undefined;
}

class ResolverFailure {
  constructor(readonly error: unknown) {}
}

function toTokenError(error: unknown, token: string): unknown {
  if (error instanceof ResolverFailure) return error.error;
  if (error instanceof DownloadTokenError) return error;
  // Checked after the signature, issuer and audience: the claims of an expired token are genuine.
  if (error instanceof errors.JWTExpired) {
    return new DownloadTokenError('TOKEN_EXPIRED', 'Download token has expired', {
      claims: error.payload as Partial<DownloadClaims>,
      cause: error,
    });
  }
  if (error instanceof errors.JWTClaimValidationFailed) {
    // A genuine token from the future: B's callers tell clock skew from forgery by this.
    const future = error.reason === 'check_failed' && (error.claim === 'nbf' || error.claim === 'iat');
    return new DownloadTokenError('TOKEN_INVALID', error.message, {
      ...(future && { claim: error.claim }),
      cause: error,
    });
  }
  if (error instanceof errors.JWSInvalid && !hasJsonHeader(token)) {
    return new DownloadTokenError('TOKEN_MALFORMED', 'Token header is not a JSON object', { cause: error });
  }
  if (error instanceof errors.JOSEError) {
    return new DownloadTokenError('TOKEN_INVALID', 'Download token is not valid', { cause: error });
  }
  return error;
}

function hasJsonHeader(token: string): boolean {
  try {
    decodeProtectedHeader(token);
    return true;
  } catch {
    return false;
  }
}

const HEX_SHA256 = /^[0-9a-f]{64}$/;
const ID = /^[A-Za-z0-9_-]{1,64}$/;

function hasDownloadClaims(payload: JWTPayload): payload is DownloadClaims & JWTPayload {
  const p = payload as Record<string, unknown>;
  return (
    typeof p.jti === 'string' &&
    p.jti.length >= 21 &&
    typeof p.sub === 'string' &&
    typeof p.aud === 'string' &&
    typeof p.fid === 'string' &&
    ID.test(p.fid) &&
    typeof p.obj === 'string' &&
    ID.test(p.obj) &&
    typeof p.name === 'string' &&
    p.name.length > 0 &&
    p.name.length <= MAX_FILE_NAME_LENGTH &&
    typeof p.ctype === 'string' &&
    p.ctype.length > 0 &&
    p.ctype.length <= 255 &&
    Number.isSafeInteger(p.size) &&
    (p.size as number) >= 0 &&
    typeof p.sha256 === 'string' &&
    HEX_SHA256.test(p.sha256) &&
    typeof p.nbf === 'number' &&
    (p.shr === undefined || (typeof p.shr === 'string' && ID.test(p.shr) && p.sub === `share:${p.shr}`))
  );
}

// C0 and C1 controls, and the bidi controls that can make "evil‮fdp.exe" read as "evilexe.pdf".
// biome-ignore lint/suspicious/noControlCharactersInRegex: removing them is the point
const UNSAFE_IN_NAMES = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

/**
 * A file name as it may be shown or offered for saving: the stored name (kept as the user gave
 * it) without control and bidi characters; never empty.
 */
export function displayFileName(name: string): string {
  return name.replace(UNSAFE_IN_NAMES, '') || 'download';
}
