/**
 * The download token: the one claim A makes to B. "The holder may download this one file, once,
 * within the next minute." Pure functions over node:crypto's Ed25519; no I/O, no clocks but the
 * one passed in. jose is the reference the tests hold verification to.
 */
import { KeyObject, sign, verify, type webcrypto } from 'node:crypto';
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
  /** Ed25519 private key: a `KeyObject` (what A holds), or a WebCrypto `CryptoKey`. */
  key: KeyObject | webcrypto.CryptoKey;
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
 * needs no judgement; every check of a token happens in `verifyDownloadToken`.
 */
export async function signDownloadToken(file: FileClaims, options: SignOptions): Promise<SignedToken> {
  const key = options.key instanceof KeyObject ? options.key : KeyObject.from(options.key);
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
export type KeyResolver = (kid: string) => Promise<KeyObject | undefined>;

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
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Verifies a download token and returns its claims, or throws `DownloadTokenError`.
 *
 * The signature is checked with node:crypto's Ed25519, synchronously: B's hot path, where jose's
 * WebCrypto verification costs about a sixth of B's throughput. Everything else is what jose's
 * `jwtVerify` checks, in its order, plus the design's own rules; the tests run jose on every
 * token they craft and fail if this accepts one jose refuses, or calls expired one it does not.
 *
 * In order: a compact JWS of JSON objects (else TOKEN_MALFORMED); no `crit`, `alg` EdDSA, a usable
 * `kid`, a key for it, the signature; then, on genuine content only: `typ`, the required claims,
 * `iss`, `aud`, `nbf`/`iat` not in the future beyond the tolerance, `exp` and the maximum age
 * (TOKEN_EXPIRED, with the claims), and the file claims well formed. Header parameters such as
 * `jku`, `x5u` and `jwk` are never looked at: the key comes only from `getKey`, by `kid`.
 */
export async function verifyDownloadToken(
  token: string,
  getKey: KeyResolver,
  options: VerifyOptions,
): Promise<DownloadClaims> {
  const { header, encodedPayload, signingInput, signature } = parseCompact(token);

  if (header.crit !== undefined) throw invalid('Token header has critical extensions B does not know');
  if (header.alg !== TOKEN_ALGORITHM) throw invalid(`Token is not signed with ${TOKEN_ALGORITHM}`);
  const { kid } = header;
  if (typeof kid !== 'string' || kid.length === 0 || kid.length > MAX_KID_LENGTH) {
    throw invalid('Token has no usable key id');
  }
  const key = await getKey(kid);
  if (!key) throw invalid('Token was signed with an unknown key');
  if (key.type !== 'public' || key.asymmetricKeyType !== 'ed25519')
    throw invalid('Key is not an Ed25519 public key');
  if (!verify(null, signingInput, key, signature)) throw invalid('Token signature does not verify');

  // Genuine from here on: A signed exactly this header and payload.
  if (typeof header.typ !== 'string' || normalizeTyp(header.typ) !== normalizeTyp(TOKEN_TYPE)) {
    throw invalid(`Token type is not ${TOKEN_TYPE}`);
  }
  let payload: Record<string, unknown>;
  try {
    payload = JSON.parse(strictUtf8.decode(Buffer.from(encodedPayload, 'base64url')));
  } catch (cause) {
    throw invalid('Token payload is not UTF-8 JSON', { cause });
  }
  for (const claim of ['iss', 'aud', 'sub', 'jti', 'iat', 'exp']) {
    if (!Object.hasOwn(payload, claim)) throw invalid(`Token has no "${claim}" claim`);
  }
  if (payload.iss !== options.issuer) throw invalid('Token was issued by someone else');
  if (payload.aud !== options.audience) throw invalid('Token is meant for another audience');
  const { iat, nbf, exp } = payload;
  if (typeof iat !== 'number' || (nbf !== undefined && typeof nbf !== 'number') || typeof exp !== 'number') {
    throw invalid('Token times are not numbers');
  }
  const now = Math.floor((options.currentDate ?? new Date()).getTime() / 1000);
  const tolerance = options.clockToleranceSeconds;
  if (nbf !== undefined && nbf > now + tolerance) throw invalid('Token is not valid yet', { claim: 'nbf' });
  if (exp <= now - tolerance) throw expired('Download token has expired', payload);
  const age = now - iat;
  if (age - tolerance > options.maxTokenAgeSeconds) throw expired('Download token is too old', payload);
  if (age < -tolerance) throw invalid('Token was issued in the future', { claim: 'iat' });
  if (!hasDownloadClaims(payload)) {
    throw invalid('Token is missing file claims or has malformed ones');
  }
  return payload;
}

/** RFC 7515 §4.1.9: `typ` is a media type, matched case-insensitively, "application/" optional. */
const normalizeTyp = (typ: string) => (typ.includes('/') ? typ : `application/${typ}`).toLowerCase();

const invalid = (message: string, details: { claim?: string; cause?: unknown } = {}) =>
  new DownloadTokenError('TOKEN_INVALID', message, details);
const expired = (message: string, payload: Record<string, unknown>) =>
  new DownloadTokenError('TOKEN_EXPIRED', message, { claims: payload as Partial<DownloadClaims> });

function parseCompact(token: string) {
  if (token.length > MAX_TOKEN_LENGTH) {
    throw new DownloadTokenError('TOKEN_MALFORMED', `Token is longer than ${MAX_TOKEN_LENGTH} characters`);
  }
  const parts = token.split('.');
  const [encodedHeader = '', encodedPayload = '', encodedSignature = ''] = parts;
  if (
    parts.length !== 3 ||
    !SEGMENT.test(encodedHeader) ||
    !SEGMENT.test(encodedPayload) ||
    !SIGNATURE.test(encodedSignature)
  ) {
    throw new DownloadTokenError('TOKEN_MALFORMED', 'Token is not a compact JWS (three base64url segments)');
  }
  const header = jsonObject(encodedHeader);
  if (!header || !jsonObject(encodedPayload)) {
    throw new DownloadTokenError('TOKEN_MALFORMED', 'Token header or payload is not a JSON object');
  }
  return {
    header,
    encodedPayload,
    signingInput: Buffer.from(`${encodedHeader}.${encodedPayload}`),
    signature: Buffer.from(encodedSignature, 'base64url'),
  };
}

function jsonObject(segment: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(Buffer.from(segment, 'base64url').toString('utf8'));
    return typeof value === 'object' && value !== null && !Array.isArray(value)
      ? (value as Record<string, unknown>)
      : undefined;
  } catch {
    return undefined;
  }
}

const HEX_SHA256 = /^[0-9a-f]{64}$/;
const ID = /^[A-Za-z0-9_-]{1,64}$/;

function hasDownloadClaims(
  payload: Record<string, unknown>,
): payload is DownloadClaims & Record<string, unknown> {
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
