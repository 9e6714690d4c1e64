/**
 * The download token: the one claim A makes to B. "The holder may download this one file, once,
 * within the next minute." Pure functions over jose; no I/O, no clocks but the one passed in.
 */
import { KeyObject, sign, type webcrypto } from 'node:crypto';
import { type CryptoKey, errors, type JWTPayload, jwtVerify } from 'jose';
import { nanoid } from 'nanoid';

/** `typ` header of every download token (RFC 8725 §3.11: explicit typing, so no other JWT fits). */
export const TOKEN_TYPE = 'dl+jwt';
/** The one signing algorithm A uses and B accepts. Asymmetric, so B can verify but never mint. */
export const TOKEN_ALGORITHM = 'EdDSA';
/** Longer tokens are refused before any parsing. Real ones stay well under 2 KB. */
export const MAX_TOKEN_LENGTH = 4096;
/** `nbf` is set this far before `iat`, so a B whose clock runs a little behind still accepts it. */
export const NOT_BEFORE_SKEW_SECONDS = 5;
/** File names longer than this are refused by A, which keeps tokens small. */
export const MAX_FILE_NAME_LENGTH = 255;

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
  constructor(
    readonly code: DownloadTokenErrorCode,
    message: string,
    readonly claims?: Partial<DownloadClaims>,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

export interface SignOptions {
  /** Ed25519 private key: a `KeyObject` (what A holds), or a `CryptoKey` from jose. */
  key: KeyObject | CryptoKey;
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

/**
 * Mints a single-use download token for `file`: a compact JWS, signed with node:crypto's Ed25519
 * directly (A's hot path; jose's WebCrypto signing costs about 1.5× as much). Producing the bytes
 * needs no judgement; every check of a token happens in `verifyDownloadToken`, with jose.
 */
export async function signDownloadToken(file: FileClaims, options: SignOptions): Promise<SignedToken> {
  const key =
    options.key instanceof KeyObject ? options.key : KeyObject.from(options.key as webcrypto.CryptoKey);
  if (key.type !== 'private' || key.asymmetricKeyType !== 'ed25519') {
    throw new TypeError('Download tokens are signed with an Ed25519 private key');
  }
  const iat = Math.floor((options.now ?? new Date()).getTime() / 1000);
  const exp = iat + options.ttlSeconds;
  const jti = nanoid();
  const header = { alg: TOKEN_ALGORITHM, kid: options.kid, typ: TOKEN_TYPE };
  const payload = {
    ...file,
    iss: options.issuer,
    aud: options.audience,
    sub: options.subject,
    jti,
    iat,
    nbf: iat - NOT_BEFORE_SKEW_SECONDS,
    exp,
  };
  const input = `${base64url(header)}.${base64url(payload)}`;
  const signature = sign(null, Buffer.from(input), key).toString('base64url');
  return { token: `${input}.${signature}`, jti, expiresAt: new Date(exp * 1000) };
}

const base64url = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');

/**
 * Returns the public key for a `kid`, or `undefined` if there is none. May refresh a key set;
 * any error it throws (keys unavailable) propagates unchanged from `verifyDownloadToken`.
 */
export type KeyResolver = (kid: string) => Promise<CryptoKey | KeyObject | undefined>;

export interface VerifyOptions {
  issuer: string;
  audience: string;
  maxTokenAgeSeconds: number;
  clockToleranceSeconds: number;
  currentDate?: Date;
}

const SEGMENT = /^[A-Za-z0-9_-]+$/;
const SIGNATURE = /^[A-Za-z0-9_-]*$/;
const MAX_KID_LENGTH = 128;

/**
 * Verifies a download token and returns its claims, or throws `DownloadTokenError`.
 * Every check of the design is explicit here: one algorithm, `typ`, `iss`, `aud`, required
 * claims, expiry, maximum age, `nbf`/`iat` not in the future beyond the tolerance, file claims
 * well formed. Header parameters such as `jku`, `x5u` and `jwk` are never looked at: the key
 * comes only from `getKey`, by `kid`.
 */
export async function verifyDownloadToken(
  token: string,
  getKey: KeyResolver,
  options: VerifyOptions,
): Promise<DownloadClaims> {
  assertWellFormed(token);
  let payload: JWTPayload;
  try {
    ({ payload } = await jwtVerify(
      token,
      async (header) => {
        const { kid } = header;
        if (typeof kid !== 'string' || kid.length === 0 || kid.length > MAX_KID_LENGTH) {
          throw new DownloadTokenError('TOKEN_INVALID', 'Token has no usable key id');
        }
        let key: Awaited<ReturnType<KeyResolver>>;
        try {
          key = await getKey(kid);
        } catch (error) {
          // The resolver's own failure (keys unavailable) must not pass for an invalid token,
          // even when it is one of jose's errors (a JWKS fetch timeout).
          throw new ResolverFailure(error);
        }
        if (!key) throw new DownloadTokenError('TOKEN_INVALID', 'Token was signed with an unknown key');
        return key;
      },
      {
        algorithms: [TOKEN_ALGORITHM],
        typ: TOKEN_TYPE,
        issuer: options.issuer,
        audience: options.audience,
        requiredClaims: ['exp', 'iat', 'jti', 'sub'],
        maxTokenAge: options.maxTokenAgeSeconds,
        clockTolerance: options.clockToleranceSeconds,
        ...(options.currentDate ? { currentDate: options.currentDate } : {}),
      },
    ));
  } catch (error) {
    throw toTokenError(error);
  }
  if (!hasDownloadClaims(payload)) {
    throw new DownloadTokenError('TOKEN_INVALID', 'Token is missing file claims or has malformed ones');
  }
  return payload;
}

function assertWellFormed(token: string): void {
  if (token.length > MAX_TOKEN_LENGTH) {
    throw new DownloadTokenError('TOKEN_MALFORMED', `Token is longer than ${MAX_TOKEN_LENGTH} characters`);
  }
  const parts = token.split('.');
  if (
    parts.length !== 3 ||
    !SEGMENT.test(parts[0] as string) ||
    !SEGMENT.test(parts[1] as string) ||
    !SIGNATURE.test(parts[2] as string)
  ) {
    throw new DownloadTokenError('TOKEN_MALFORMED', 'Token is not a compact JWS (three base64url segments)');
  }
  if (!isJsonObject(parts[0] as string) || !isJsonObject(parts[1] as string)) {
    throw new DownloadTokenError('TOKEN_MALFORMED', 'Token header or payload is not a JSON object');
  }
}

function isJsonObject(segment: string): boolean {
  try {
    const value: unknown = JSON.parse(Buffer.from(segment, 'base64url').toString('utf8'));
    return typeof value === 'object' && value !== null && !Array.isArray(value);
  } catch {
    return false;
  }
}

class ResolverFailure {
  constructor(readonly error: unknown) {}
}

function toTokenError(error: unknown): unknown {
  if (error instanceof ResolverFailure) return error.error;
  if (error instanceof DownloadTokenError) return error;
  // Expiry is checked only after the signature, so the claims of an expired token are genuine.
  if (error instanceof errors.JWTExpired) {
    return new DownloadTokenError(
      'TOKEN_EXPIRED',
      'Download token has expired',
      error.payload as Partial<DownloadClaims>,
      {
        cause: error,
      },
    );
  }
  if (error instanceof errors.JOSEError) {
    return new DownloadTokenError('TOKEN_INVALID', 'Download token is not valid', undefined, {
      cause: error,
    });
  }
  return error;
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
    typeof p.nbf === 'number'
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
