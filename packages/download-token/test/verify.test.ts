/**
 * Table-driven tests of `verifyDownloadToken` against the README's "How a download works".
 * Time is fixed with `now` / `currentDate`; nothing sleeps. Hostile tokens are crafted with jose's
 * `CompactSign` (which validates no claims) or by hand with `node:crypto`.
 */
import { createHmac, KeyObject, sign as nodeSign, type webcrypto } from 'node:crypto';
import {
  type CompactJWSHeaderParameters,
  CompactSign,
  type CryptoKey,
  decodeProtectedHeader,
  errors,
  exportJWK,
  generateKeyPair,
  importJWK,
  type JWK,
  jwtVerify,
} from 'jose';
import { describe, expect, it } from 'vitest';
import {
  DownloadTokenError,
  type DownloadTokenErrorCode,
  type FileClaims,
  type KeyResolver,
  MAX_TOKEN_LENGTH,
  NOT_BEFORE_SKEW_SECONDS,
  signDownloadToken,
  TOKEN_ALGORITHM,
  TOKEN_ALGORITHMS,
  TOKEN_TYPE,
  type TokenAlgorithm,
  type VerifyOptions,
  verifyDownloadToken,
} from '../src/index.ts';

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const ISSUER = 'http://a.test';
const AUDIENCE = 'http://b.test';
const KID = 'a-2030-06';
const TTL = 60;
const MAX_AGE = 300;
const TOLERANCE = 5;
const NOW = new Date('2030-06-15T12:00:00.000Z');
const NOW_S = Math.floor(NOW.getTime() / 1000);
const JTI = 'V1StGXR8_Z5jdHi6B-myT'; // 21 chars, nanoid alphabet

const FILE: FileClaims = {
  fid: 'f_9a8b7c6d5e',
  obj: 'o_1234567890abcdef',
  name: 'report Q2 (final).pdf',
  ctype: 'application/pdf',
  size: 123456,
  sha256: 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
};

/** The whole suite, for each algorithm a key may have: ES256 (new keys) and EdDSA (keys made before). */
async function suite(ALG: TokenAlgorithm) {
  const OTHER: TokenAlgorithm = ALG === 'ES256' ? 'EdDSA' : 'ES256';
  const VERIFY: VerifyOptions = {
    algorithms: [ALG],
    issuer: ISSUER,
    audience: AUDIENCE,
    maxTokenAgeSeconds: MAX_AGE,
    clockToleranceSeconds: TOLERANCE,
    currentDate: NOW,
  };

  /** A's signing key pair; B knows only the public half, imported from its JWK as B would. */
  const aKeys = await generateKeyPair(ALG, { extractable: true });
  const aPrivate = aKeys.privateKey;
  const aPrivateObject = KeyObject.from(aPrivate as unknown as webcrypto.CryptoKey);
  const aPublicJwk: JWK = await exportJWK(aKeys.publicKey);
  const bPublic = await importPublic(aPublicJwk);

  /** An attacker's own key pair, unknown to B. */
  const attackerKeys = await generateKeyPair(ALG, { extractable: true });
  const attackerPublicJwk: JWK = await exportJWK(attackerKeys.publicKey);

  /** Keys for algorithms outside the allowlist. */
  const otherKeys = await generateKeyPair(OTHER);
  const rs256Keys = await generateKeyPair('RS256');

  async function importPublic(jwk: JWK): Promise<CryptoKey> {
    const key = await importJWK({ ...jwk, alg: ALG }, ALG);
    if (key instanceof Uint8Array) throw new Error('expected an asymmetric key');
    return key;
  }

  // ---------------------------------------------------------------------------------------------
  // Helpers
  // ---------------------------------------------------------------------------------------------

  type Json = Record<string, unknown>;

  /** A recording key resolver: B's view of A's JWKS, by kid. */
  function resolver(keys: ReadonlyMap<string, CryptoKey> = new Map([[KID, bPublic]])) {
    const calls: string[] = [];
    const getKey: KeyResolver = async (kid) => {
      calls.push(kid);
      return keys.get(kid);
    };
    return { calls, getKey, keys };
  }

  /**
   * `verifyDownloadToken`, with jose's `jwtVerify` as the reference on the same token and keys:
   * whatever it accepts, jose accepts with the same claims, and whatever it calls expired, jose
   * does too (the product's own rules may refuse more; never less).
   */
  async function verify(token: string, options: Partial<VerifyOptions> = {}, keys = resolver()) {
    const merged = { ...VERIFY, ...options };
    const ours = await verifyDownloadToken(token, keys.getKey, merged).then(
      (claims) => ({ claims }),
      (error: unknown) => ({ error }),
    );
    const reference = await jwtVerify(
      token,
      async (header) => {
        const key = typeof header.kid === 'string' ? keys.keys.get(header.kid) : undefined;
        if (!key) throw new errors.JWKSNoMatchingKey();
        return key;
      },
      {
        algorithms: [...merged.algorithms],
        typ: TOKEN_TYPE,
        issuer: merged.issuer,
        audience: merged.audience,
        requiredClaims: ['exp', 'iat', 'jti', 'sub'],
        maxTokenAge: merged.maxTokenAgeSeconds,
        clockTolerance: merged.clockToleranceSeconds,
        ...(merged.currentDate ? { currentDate: merged.currentDate } : {}),
      },
    ).then(
      ({ payload }) => ({ claims: payload }),
      (error: unknown) => ({ error }),
    );
    if ('claims' in ours) expect(reference, 'jose refuses a token this accepted').toEqual(ours);
    if ('error' in ours && (ours.error as DownloadTokenError).code === 'TOKEN_EXPIRED') {
      expect((reference as { error?: unknown }).error, 'jose does not call it expired').toBeInstanceOf(
        errors.JWTExpired,
      );
    }
    if ('error' in ours) throw ours.error;
    return ours.claims;
  }

  /** Asserts the promise rejects with a DownloadTokenError of exactly `code`, and returns it. */
  async function expectCode(
    promise: Promise<unknown>,
    code: DownloadTokenErrorCode,
  ): Promise<DownloadTokenError> {
    await expect(promise).rejects.toBeInstanceOf(DownloadTokenError);
    await expect(promise).rejects.toMatchObject({ code });
    const error = (await promise.catch((e: unknown) => e)) as DownloadTokenError;
    // Claims are only handed out for expired tokens whose signature verified.
    if (code !== 'TOKEN_EXPIRED') expect(error.claims).toBeUndefined();
    return error;
  }

  function claims(overrides: Json = {}, omit: readonly string[] = []): Json {
    const c: Json = {
      iss: ISSUER,
      aud: AUDIENCE,
      sub: 'user-42',
      jti: JTI,
      iat: NOW_S,
      nbf: NOW_S - NOT_BEFORE_SKEW_SECONDS,
      exp: NOW_S + TTL,
      ...FILE,
      ...overrides,
    };
    for (const key of omit) delete c[key];
    return c;
  }

  function header(overrides: Json = {}, omit: readonly string[] = []): CompactJWSHeaderParameters {
    const h: Json = { alg: ALG, typ: TOKEN_TYPE, kid: KID, ...overrides };
    for (const key of omit) delete h[key];
    return h as CompactJWSHeaderParameters;
  }

  /** Signs arbitrary claims and header with CompactSign (no claim validation). */
  function craft(
    payload: Json = claims(),
    protectedHeader: CompactJWSHeaderParameters = header(),
    key: CryptoKey | Uint8Array = aPrivate,
  ): Promise<string> {
    return new CompactSign(new TextEncoder().encode(JSON.stringify(payload)))
      .setProtectedHeader(protectedHeader)
      .sign(key);
  }

  const b64u = (value: unknown): string =>
    Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

  /** Signs two already encoded segments by hand (node:crypto: the test's own, not jose). */
  function signSegments(
    headerSegment: string,
    payloadSegment: string,
    key: KeyObject = aPrivateObject,
  ): string {
    const data = Buffer.from(`${headerSegment}.${payloadSegment}`);
    const signature =
      ALG === 'EdDSA'
        ? nodeSign(null, data, key)
        : nodeSign('sha256', data, { key, dsaEncoding: 'ieee-p1363' });
    return `${headerSegment}.${payloadSegment}.${signature.toString('base64url')}`;
  }

  function hmacToken(secret: string | Buffer, protectedHeader: Json = header({ alg: 'HS256' })): string {
    const h = b64u(protectedHeader);
    const p = b64u(claims());
    return `${h}.${p}.${createHmac('sha256', secret).update(`${h}.${p}`).digest('base64url')}`;
  }

  function segments(token: string): [string, string, string] {
    const [h, p, s, ...rest] = token.split('.');
    if (h === undefined || p === undefined || s === undefined || rest.length > 0)
      throw new Error('not a JWS');
    return [h, p, s];
  }

  function withSignature(token: string, signature: string): string {
    const [h, p] = segments(token);
    return `${h}.${p}.${signature}`;
  }

  function flipSignatureBit(token: string, byteIndex: number): string {
    const bytes = Buffer.from(segments(token)[2], 'base64url');
    bytes.writeUInt8(bytes.readUInt8(byteIndex) ^ 0x01, byteIndex);
    return withSignature(token, bytes.toString('base64url'));
  }

  /** Re-encodes the payload with `edit` applied but keeps the original header and signature. */
  function editPayload(token: string, edit: (payload: Json) => void): string {
    const [h, p, s] = segments(token);
    const payload = JSON.parse(Buffer.from(p, 'base64url').toString('utf8')) as Json;
    edit(payload);
    return `${h}.${b64u(payload)}.${s}`;
  }

  function editHeader(token: string, edit: (protectedHeader: Json) => void): string {
    const [h, p, s] = segments(token);
    const protectedHeader = JSON.parse(Buffer.from(h, 'base64url').toString('utf8')) as Json;
    edit(protectedHeader);
    return `${b64u(protectedHeader)}.${p}.${s}`;
  }

  /** A token signed by A through the public API. */
  async function realToken(options: { now?: Date; ttlSeconds?: number } = {}): Promise<string> {
    const { token } = await signDownloadToken(FILE, {
      key: aPrivate,
      kid: KID,
      issuer: ISSUER,
      audience: AUDIENCE,
      subject: 'user-42',
      ttlSeconds: options.ttlSeconds ?? TTL,
      now: options.now ?? NOW,
    });
    return token;
  }

  const at = (secondsFromNow: number): Date => new Date(NOW.getTime() + secondsFromNow * 1000);

  /**
   * A validly signed token of exactly `length` characters (padded with an extra claim; the kid is
   * varied by one character when that exact length is not reachable with base64url).
   */
  function tokenOfLength(length: number): { token: string; kid: string } {
    const signatureLength = 86; // 64 bytes base64url
    for (const kid of [KID, `${KID}x`, `${KID}xy`]) {
      const h = b64u(header({ kid }));
      for (let pad = 0; pad < length; pad++) {
        const p = b64u(claims({ pad: 'x'.repeat(pad) }));
        const total = h.length + p.length + signatureLength + 2;
        if (total === length) return { token: signSegments(h, p), kid };
        if (total > length) break;
      }
    }
    throw new Error(`cannot build a token of length ${length}`);
  }

  // ---------------------------------------------------------------------------------------------
  // Tests
  // ---------------------------------------------------------------------------------------------

  describe(ALG, () => {
    describe('signDownloadToken / verifyDownloadToken round trip', () => {
      it('returns every claim of a valid token, with the documented header', async () => {
        const signed = await signDownloadToken(FILE, {
          key: aPrivate,
          kid: KID,
          issuer: ISSUER,
          audience: AUDIENCE,
          subject: 'user-42',
          ttlSeconds: TTL,
          now: NOW,
        });

        expect(decodeProtectedHeader(signed.token)).toEqual({ alg: ALG, typ: 'dl+jwt', kid: KID });
        expect(signed.jti.length).toBeGreaterThanOrEqual(21);
        expect(signed.expiresAt).toEqual(at(TTL));

        const keys = resolver();
        const verified = await verify(signed.token, {}, keys);
        expect(verified).toEqual({
          iss: ISSUER,
          aud: AUDIENCE,
          sub: 'user-42',
          jti: signed.jti,
          iat: NOW_S,
          nbf: NOW_S - NOT_BEFORE_SKEW_SECONDS,
          exp: NOW_S + TTL,
          ...FILE,
        });
        expect(keys.calls).toEqual([KID]);
      });

      it('carries the share id of a token minted through a share link (shr, sub share:<id>)', async () => {
        const signed = await signDownloadToken(
          { ...FILE, shr: 'sh_AbC-12' },
          {
            key: aPrivate,
            kid: KID,
            issuer: ISSUER,
            audience: AUDIENCE,
            subject: 'share:sh_AbC-12',
            ttlSeconds: TTL,
            now: NOW,
          },
        );
        const verified = await verify(signed.token);
        expect(verified).toMatchObject({ sub: 'share:sh_AbC-12', shr: 'sh_AbC-12', fid: FILE.fid });
      });

      it('mints a fresh jti for every token', async () => {
        const [a, b] = await Promise.all([realToken(), realToken()]);
        const [ca, cb] = await Promise.all([verify(a), verify(b)]);
        expect(ca.jti).not.toBe(cb.jti);
      });

      it('signs under the algorithm of its key, and refuses a public key or a key of another algorithm', async () => {
        const options = {
          kid: KID,
          issuer: ISSUER,
          audience: AUDIENCE,
          subject: 'u',
          ttlSeconds: TTL,
          now: NOW,
        };
        const other = await signDownloadToken(FILE, { ...options, key: otherKeys.privateKey });
        expect(decodeProtectedHeader(other.token).alg).toBe(OTHER);

        const wrongKeys = [
          aKeys.publicKey,
          (await generateKeyPair('RS256')).privateKey,
          (await generateKeyPair('ES384')).privateKey,
        ];
        for (const key of wrongKeys) {
          await expect(signDownloadToken(FILE, { ...options, key })).rejects.toThrow(
            /signed with a private ES256 or EdDSA key/,
          );
        }
      });

      it('exports the documented constants', () => {
        expect(TOKEN_TYPE).toBe('dl+jwt');
        expect(TOKEN_ALGORITHM).toBe('ES256');
        expect(TOKEN_ALGORITHMS).toEqual(['ES256', 'EdDSA']);
        expect(MAX_TOKEN_LENGTH).toBe(4096);
      });
    });

    describe('accepted edge cases (so the rejections below fail for the reason they name)', () => {
      interface AcceptCase {
        name: string;
        token: () => Promise<string>;
        options?: Partial<VerifyOptions>;
      }
      const cases: AcceptCase[] = [
        { name: 'crafted baseline token', token: () => craft() },
        {
          name: 'exp passed by less than the clock tolerance',
          token: () => realToken(),
          options: { currentDate: at(TTL + TOLERANCE - 1) },
        },
        {
          name: 'age just within maxTokenAge + tolerance',
          token: () => realToken({ ttlSeconds: 3600 }),
          options: { currentDate: at(MAX_AGE + TOLERANCE) },
        },
        {
          name: 'nbf in the future within the tolerance',
          token: () => craft(claims({ nbf: NOW_S + TOLERANCE })),
        },
        {
          name: 'iat in the future within the tolerance',
          token: () => craft(claims({ iat: NOW_S + TOLERANCE })),
        },
        { name: 'name of exactly 255 characters', token: () => craft(claims({ name: 'n'.repeat(255) })) },
        { name: 'non-ASCII name', token: () => craft(claims({ name: 'Ünïcødé 文件.txt' })) },
        { name: 'size 0', token: () => craft(claims({ size: 0 })) },
        {
          name: 'size Number.MAX_SAFE_INTEGER',
          token: () => craft(claims({ size: Number.MAX_SAFE_INTEGER })),
        },
        { name: 'jti of exactly 21 characters', token: () => craft(claims({ jti: 'a'.repeat(21) })) },
        // RFC 7515 §4.1.9: typ is a media type; "application/" may be omitted and matching is case-insensitive.
        {
          name: "typ 'application/dl+jwt'",
          token: () => craft(claims(), header({ typ: 'application/dl+jwt' })),
        },
        { name: "typ 'DL+JWT'", token: () => craft(claims(), header({ typ: 'DL+JWT' })) },
      ];

      it.each(cases)('$name', async ({ token, options }) => {
        const keys = resolver();
        await expect(verify(await token(), options, keys)).resolves.toMatchObject({ fid: FILE.fid });
        expect(keys.calls).toEqual([KID]);
      });

      it('a signature re-encoded with non-zero padding bits is the same token (same jti, so still single use)', async () => {
        // 64 bytes encode to 86 base64url characters; the low 4 bits of the last one carry no data, and
        // jose (like atob) ignores them. Such a variant is a different string for the same token, so
        // single use must rest on the jti (as the design says), never on the token string.
        const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
        const token = await realToken();
        const signature = segments(token)[2];
        const last = alphabet.indexOf(signature.slice(-1));
        const variant = withSignature(token, `${signature.slice(0, -1)}${alphabet[last ^ 0x01]}`);
        expect(variant).not.toBe(token);
        const [original, reencoded] = await Promise.all([verify(token), verify(variant)]);
        expect(reencoded.jti).toBe(original.jti);
      });

      it(`accepts a token of exactly MAX_TOKEN_LENGTH (${MAX_TOKEN_LENGTH}) characters`, async () => {
        const { token, kid } = tokenOfLength(MAX_TOKEN_LENGTH);
        expect(token).toHaveLength(MAX_TOKEN_LENGTH);
        await expect(verify(token, {}, resolver(new Map([[kid, bPublic]])))).resolves.toMatchObject({
          fid: FILE.fid,
        });
      });
    });

    describe('TOKEN_MALFORMED', () => {
      interface MalformedCase {
        name: string;
        token: () => Promise<string> | string;
      }
      const cases: MalformedCase[] = [
        { name: 'empty string', token: () => '' },
        { name: 'three empty segments', token: () => '..' },
        {
          name: `one character longer than ${MAX_TOKEN_LENGTH}`,
          token: () => {
            const { token } = tokenOfLength(MAX_TOKEN_LENGTH);
            return `${token}A`;
          },
        },
        {
          name: 'longer than 4096 characters (validly signed)',
          token: () => craft(claims({ pad: 'x'.repeat(4096) })),
        },
        { name: '10 KB of garbage', token: () => 'A'.repeat(10 * 1024) },
        {
          // Over the length limit, so it is refused as malformed before the kid is even looked at.
          name: 'a 10 KB long kid',
          token: () => craft(claims(), header({ kid: 'k'.repeat(10 * 1024) })),
        },
        { name: 'one segment', token: async () => segments(await realToken())[0] },
        {
          name: '2 segments',
          token: async () => {
            const [h, p] = segments(await realToken());
            return `${h}.${p}`;
          },
        },
        { name: '4 segments', token: async () => `${await realToken()}.${b64u('extra')}` },
        { name: '5 segments (JWE shape)', token: async () => `${await realToken()}.AAAA.BBBB` },
        {
          name: 'empty header segment',
          token: async () => {
            const [, p, s] = segments(await realToken());
            return `.${p}.${s}`;
          },
        },
        {
          name: 'empty payload segment',
          token: async () => {
            const [h, , s] = segments(await realToken());
            return `${h}..${s}`;
          },
        },
        {
          name: "'+' (standard base64) in the header",
          token: async () => {
            const [h, p, s] = segments(await realToken());
            return `${h}+.${p}.${s}`;
          },
        },
        {
          name: "'/' (standard base64) in the payload",
          token: async () => {
            const [h, p, s] = segments(await realToken());
            return `${h}.${p.slice(0, 10)}/${p.slice(11)}.${s}`;
          },
        },
        { name: "'=' padding on the signature", token: async () => `${await realToken()}==` },
        {
          name: 'whitespace inside the payload',
          token: async () => {
            const [h, p, s] = segments(await realToken());
            return `${h}.${p.slice(0, 8)} ${p.slice(8)}.${s}`;
          },
        },
        { name: 'non-ASCII character in the signature', token: async () => `${await realToken()}é` },
        { name: 'percent-encoded dot', token: async () => (await realToken()).replace('.', '%2E') },
        { name: 'header not JSON', token: () => signSegments(b64u('not json at all'), b64u(claims())) },
        { name: 'header truncated JSON', token: () => signSegments(b64u('{"alg":"EdDSA",'), b64u(claims())) },
        { name: 'payload not JSON', token: () => signSegments(b64u(header()), b64u('hello world')) },
        { name: 'payload truncated JSON', token: () => signSegments(b64u(header()), b64u('{"iss":')) },
        { name: 'header is a JSON array', token: () => signSegments(b64u([header()]), b64u(claims())) },
        { name: 'header is a JSON number', token: () => signSegments(b64u(42), b64u(claims())) },
        {
          name: 'header is a JSON string',
          token: () => signSegments(b64u(JSON.stringify('EdDSA')), b64u(claims())),
        },
        { name: 'header is JSON null', token: () => signSegments(b64u(null), b64u(claims())) },
        { name: 'header is JSON true', token: () => signSegments(b64u(true), b64u(claims())) },
        { name: 'payload is a JSON array', token: () => signSegments(b64u(header()), b64u([claims()])) },
        { name: 'payload is a JSON number', token: () => signSegments(b64u(header()), b64u(1)) },
        {
          name: 'payload is a JSON string',
          token: () => signSegments(b64u(header()), b64u(JSON.stringify('x'))),
        },
        { name: 'payload is JSON null', token: () => signSegments(b64u(header()), b64u(null)) },
      ];

      it.each(cases)('$name', async ({ token }) => {
        const keys = resolver();
        await expectCode(verify(await token(), {}, keys), 'TOKEN_MALFORMED');
        expect(keys.calls).toEqual([]);
      });

      it('refuses a malformed token before asking a failing resolver', async () => {
        const failing: KeyResolver = async () => {
          throw new Error('keys unavailable');
        };
        await expectCode(verifyDownloadToken('a.b', failing, VERIFY), 'TOKEN_MALFORMED');
      });
    });

    describe('TOKEN_INVALID', () => {
      interface InvalidCase {
        name: string;
        token: () => Promise<string> | string;
        /** Exact resolver calls expected; omitted when any (or none) is acceptable. */
        calls?: string[];
        options?: Partial<VerifyOptions>;
      }

      const algorithmCases: InvalidCase[] = [
        ...['none', 'None', 'NONE', 'nOnE'].map(
          (alg): InvalidCase => ({
            name: `alg '${alg}' with empty signature`,
            token: () => `${b64u(header({ alg }))}.${b64u(claims())}.`,
            calls: [],
          }),
        ),
        {
          name: "alg 'none' with a real signature attached",
          token: async () =>
            `${b64u(header({ alg: 'none' }))}.${b64u(claims())}.${segments(await realToken())[2]}`,
          calls: [],
        },
        {
          name: 'HS256 with the public JWK JSON as HMAC secret',
          token: () => hmacToken(JSON.stringify(aPublicJwk)),
          calls: [],
        },
        {
          name: 'HS256 with the raw public key bytes as HMAC secret',
          token: () => hmacToken(Buffer.from(aPublicJwk.x as string, 'base64url')),
          calls: [],
        },
        {
          name: 'HS256 with the SPKI PEM public key as HMAC secret',
          token: async () => {
            const pem = KeyObject.from(bPublic as unknown as webcrypto.CryptoKey).export({
              type: 'spki',
              format: 'pem',
            });
            return hmacToken(pem);
          },
          calls: [],
        },
        {
          name: 'HS256 with a random secret',
          token: () => craft(claims(), header({ alg: 'HS256' }), new Uint8Array(32).fill(7)),
          calls: [],
        },
        {
          name: `${OTHER} (outside the allowlist)`,
          token: () => craft(claims(), header({ alg: OTHER }), otherKeys.privateKey),
          calls: [],
        },
        {
          name: 'RS256 (outside the allowlist)',
          token: () => craft(claims(), header({ alg: 'RS256' }), rs256Keys.privateKey),
          calls: [],
        },
        ...(ALG === 'EdDSA'
          ? [
              {
                name: "fully specified 'Ed25519' alg, signed by the real key (allowlist holds exactly EdDSA)",
                token: () => craft(claims(), header({ alg: 'Ed25519' })),
                calls: [],
              },
            ]
          : []),
        {
          name: `alg '${ALG.toLowerCase()}' (wrong case)`,
          token: () => signSegments(b64u(header({ alg: ALG.toLowerCase() })), b64u(claims())),
          calls: [],
        },
        {
          name: `${OTHER} under A's kid with both algorithms allowed (a key verifies only under its own)`,
          token: () => craft(claims(), header({ alg: OTHER }), otherKeys.privateKey),
          options: { algorithms: TOKEN_ALGORITHMS },
          calls: [KID],
        },
        {
          name: 'alg missing',
          token: () => signSegments(b64u(header({}, ['alg'])), b64u(claims())),
          calls: [],
        },
        {
          name: 'alg is a number',
          token: () => signSegments(b64u(header({ alg: 1 })), b64u(claims())),
          calls: [],
        },
      ];

      const signatureCases: InvalidCase[] = [
        {
          name: 'stripped signature (empty third segment)',
          token: async () => withSignature(await realToken(), ''),
        },
        {
          name: 'truncated signature',
          token: async () => withSignature(await realToken(), segments(await realToken())[2].slice(0, -4)),
        },
        {
          name: 'signature with extra bytes',
          token: async () => withSignature(await realToken(), `${segments(await realToken())[2]}AAAA`),
        },
        {
          name: 'one bit flipped in the first signature byte',
          token: async () => flipSignatureBit(await realToken(), 0),
        },
        {
          name: 'one bit flipped in the last signature byte',
          token: async () => flipSignatureBit(await realToken(), 63),
        },
        {
          name: 'all-zero 64-byte signature',
          token: async () => withSignature(await realToken(), b64u(Buffer.alloc(64))),
        },
        {
          name: 'payload edited (size) keeping the old signature',
          token: async () =>
            editPayload(await realToken(), (p) => {
              p.size = 1;
            }),
          calls: [KID],
        },
        {
          name: 'payload edited (sub) keeping the old signature',
          token: async () =>
            editPayload(await realToken(), (p) => {
              p.sub = 'admin';
            }),
          calls: [KID],
        },
        {
          name: 'payload edited (exp extended) keeping the old signature',
          token: async () =>
            editPayload(await realToken(), (p) => {
              p.exp = NOW_S + 86400;
            }),
          calls: [KID],
        },
        {
          name: 'header edited (jku added) keeping the old signature',
          token: async () =>
            editHeader(await realToken(), (h) => {
              h.jku = 'https://evil.test/jwks.json';
            }),
          calls: [KID],
        },
        {
          name: 'signature of another valid token spliced on',
          token: async () => withSignature(await realToken(), segments(await realToken({ now: at(1) }))[2]),
          calls: [KID],
        },
        {
          name: 'valid signature by a key the resolver does not know (unknown kid)',
          token: () => craft(claims(), header({ kid: 'attacker-key' }), attackerKeys.privateKey),
          calls: ['attacker-key'],
        },
        {
          name: "attacker's key claiming A's kid",
          token: () => craft(claims(), header(), attackerKeys.privateKey),
          calls: [KID],
        },
        {
          name: "A's key under a kid the resolver does not know (rotated out)",
          token: () => craft(claims(), header({ kid: 'a-2029-01' })),
          calls: ['a-2029-01'],
        },
      ];

      const embeddedKeyHeaders = {
        jku: 'https://evil.test/.well-known/jwks.json',
        x5u: 'https://evil.test/cert.pem',
        x5c: ['MIIBdGVzdA=='],
        jwk: attackerPublicJwk,
      };
      const keyHeaderCases: InvalidCase[] = [
        {
          name: 'jku + x5u + x5c + embedded attacker jwk, attacker kid, signed by attacker',
          token: () =>
            craft(claims(), header({ ...embeddedKeyHeaders, kid: 'attacker-key' }), attackerKeys.privateKey),
          calls: ['attacker-key'],
        },
        {
          name: "jku + x5u + x5c + embedded attacker jwk, A's kid, signed by attacker",
          token: () => craft(claims(), header(embeddedKeyHeaders), attackerKeys.privateKey),
          calls: [KID],
        },
        {
          name: 'embedded attacker jwk and no kid, signed by attacker',
          token: () => craft(claims(), header(embeddedKeyHeaders, ['kid']), attackerKeys.privateKey),
          calls: [],
        },
        { name: 'no kid (signed by A)', token: () => craft(claims(), header({}, ['kid'])), calls: [] },
        { name: 'empty kid', token: () => craft(claims(), header({ kid: '' })), calls: [] },
        {
          name: 'numeric kid',
          token: () => signSegments(b64u(header({ kid: 42 })), b64u(claims())),
          calls: [],
        },
        {
          name: 'kid as an array',
          token: () => signSegments(b64u(header({ kid: [KID] })), b64u(claims())),
          calls: [],
        },
        {
          name: "kid '../../etc/passwd'",
          token: () => craft(claims(), header({ kid: '../../etc/passwd' })),
          calls: ['../../etc/passwd'],
        },
        {
          name: 'kid "\' OR 1=1 --"',
          token: () => craft(claims(), header({ kid: "' OR 1=1 --" })),
          calls: ["' OR 1=1 --"],
        },
        {
          name: "kid '__proto__'",
          token: () => craft(claims(), header({ kid: '__proto__' })),
          calls: ['__proto__'],
        },
        {
          name: 'kid of 129 characters',
          token: () => craft(claims(), header({ kid: 'k'.repeat(129) })),
          calls: [],
        },
        {
          name: 'kid of 2 KB (token still under 4096 characters)',
          token: async () => {
            const token = await craft(claims(), header({ kid: 'k'.repeat(2048) }));
            expect(token.length).toBeLessThanOrEqual(MAX_TOKEN_LENGTH);
            return token;
          },
          calls: [],
        },
      ];

      const headerCases: InvalidCase[] = [
        { name: 'typ missing', token: () => craft(claims(), header({}, ['typ'])) },
        { name: "typ 'JWT'", token: () => craft(claims(), header({ typ: 'JWT' })) },
        { name: "typ 'at+jwt'", token: () => craft(claims(), header({ typ: 'at+jwt' })) },
        { name: "typ 'application/jwt'", token: () => craft(claims(), header({ typ: 'application/jwt' })) },
        { name: "typ 'dl+jwt ' (trailing space)", token: () => craft(claims(), header({ typ: 'dl+jwt ' })) },
        { name: 'typ as a number', token: () => signSegments(b64u(header({ typ: 1 })), b64u(claims())) },
        // CompactSign refuses unrecognised crit parameters, so these are signed by hand.
        {
          name: "crit ['exp'] (exp present in the payload)",
          token: () => signSegments(b64u(header({ crit: ['exp'] })), b64u(claims())),
        },
        {
          name: "crit ['exp'] with exp also in the header",
          token: () => signSegments(b64u(header({ crit: ['exp'], exp: NOW_S + TTL })), b64u(claims())),
        },
        {
          name: "crit ['foo'] with foo present",
          token: () => signSegments(b64u(header({ crit: ['foo'], foo: 'bar' })), b64u(claims())),
        },
        { name: 'crit empty array', token: () => signSegments(b64u(header({ crit: [] })), b64u(claims())) },
        {
          name: "unencoded payload (b64: false, crit ['b64'])",
          token: () => signSegments(b64u(header({ b64: false, crit: ['b64'] })), b64u(claims())),
        },
      ];

      const longName = 'n'.repeat(256);
      const claimCases: InvalidCase[] = [
        { name: 'wrong iss', token: () => craft(claims({ iss: 'http://evil.test' })) },
        { name: 'iss with a trailing slash', token: () => craft(claims({ iss: `${ISSUER}/` })) },
        { name: 'missing iss', token: () => craft(claims({}, ['iss'])) },
        { name: 'iss as an array', token: () => craft(claims({ iss: [ISSUER] })) },
        { name: 'wrong aud', token: () => craft(claims({ aud: 'http://c.test' })) },
        { name: 'missing aud', token: () => craft(claims({}, ['aud'])) },
        // jose accepts an array aud containing the expected value; the verifier requires a string.
        {
          name: 'aud array with the right audience plus another',
          token: () => craft(claims({ aud: [AUDIENCE, 'http://c.test'] })),
        },
        { name: 'aud array with only the right audience', token: () => craft(claims({ aud: [AUDIENCE] })) },
        ...['exp', 'iat', 'jti', 'sub', 'nbf'].map(
          (claim): InvalidCase => ({ name: `missing ${claim}`, token: () => craft(claims({}, [claim])) }),
        ),
        ...Object.keys(FILE).map(
          (claim): InvalidCase => ({
            name: `missing file claim ${claim}`,
            token: () => craft(claims({}, [claim])),
          }),
        ),
        { name: 'exp as a string', token: () => craft(claims({ exp: String(NOW_S + TTL) })) },
        { name: 'iat as a string', token: () => craft(claims({ iat: String(NOW_S) })) },
        { name: 'nbf as a string', token: () => craft(claims({ nbf: String(NOW_S - 5) })) },
        { name: 'exp null', token: () => craft(claims({ exp: null })) },
        { name: 'sub as a number', token: () => craft(claims({ sub: 42 })) },
        { name: 'jti as a number', token: () => craft(claims({ jti: 1234567890123456 })) },
        { name: 'jti of 20 characters', token: () => craft(claims({ jti: 'a'.repeat(20) })) },
        { name: 'jti empty', token: () => craft(claims({ jti: '' })) },
        { name: 'shr as a number', token: () => craft(claims({ sub: 'share:42', shr: 42 })) },
        { name: 'shr empty', token: () => craft(claims({ sub: 'share:', shr: '' })) },
        { name: 'shr with a slash', token: () => craft(claims({ sub: 'share:a/b', shr: 'a/b' })) },
        {
          name: 'shr of 65 characters',
          token: () => craft(claims({ sub: `share:${'a'.repeat(65)}`, shr: 'a'.repeat(65) })),
        },
        { name: 'shr whose sub is not share:<shr>', token: () => craft(claims({ shr: 'sh_1' })) },
        {
          name: 'shr of another share than sub',
          token: () => craft(claims({ sub: 'share:sh_2', shr: 'sh_1' })),
        },
        { name: 'sha256 uppercase', token: () => craft(claims({ sha256: FILE.sha256.toUpperCase() })) },
        { name: 'sha256 of 63 characters', token: () => craft(claims({ sha256: FILE.sha256.slice(1) })) },
        { name: 'sha256 of 65 characters', token: () => craft(claims({ sha256: `${FILE.sha256}0` })) },
        { name: 'sha256 not hex', token: () => craft(claims({ sha256: `g${FILE.sha256.slice(1)}` })) },
        { name: 'size negative', token: () => craft(claims({ size: -1 })) },
        { name: 'size a float', token: () => craft(claims({ size: 1.5 })) },
        { name: 'size a string', token: () => craft(claims({ size: '123456' })) },
        { name: 'size above Number.MAX_SAFE_INTEGER', token: () => craft(claims({ size: 2 ** 53 })) },
        { name: 'name empty', token: () => craft(claims({ name: '' })) },
        { name: 'name of 256 characters', token: () => craft(claims({ name: longName })) },
        { name: 'name not a string', token: () => craft(claims({ name: ['a.txt'] })) },
        { name: "obj with '/'", token: () => craft(claims({ obj: 'o_12/34' })) },
        { name: "obj '../../etc/passwd'", token: () => craft(claims({ obj: '../../etc/passwd' })) },
        { name: "fid with '/'", token: () => craft(claims({ fid: 'f/1' })) },
        { name: 'fid of 65 characters', token: () => craft(claims({ fid: 'f'.repeat(65) })) },
        { name: 'ctype empty', token: () => craft(claims({ ctype: '' })) },
        { name: 'ctype of 256 characters', token: () => craft(claims({ ctype: 'c'.repeat(256) })) },
        {
          name: 'nbf in the future beyond the clock tolerance',
          token: () => craft(claims({ nbf: NOW_S + TOLERANCE + 1 })),
        },
        {
          name: 'iat in the future beyond the clock tolerance',
          token: () => craft(claims({ iat: NOW_S + TOLERANCE + 1, exp: NOW_S + TOLERANCE + 1 + TTL })),
        },
        {
          name: 'token verified before it was issued (clock far behind)',
          token: () => realToken(),
          options: { currentDate: at(-(NOT_BEFORE_SKEW_SECONDS + TOLERANCE + 1)) },
        },
      ];

      describe('algorithm', () => {
        it.each(algorithmCases)('$name', async ({ token, calls, options }) => {
          const keys = resolver();
          await expectCode(verify(await token(), options, keys), 'TOKEN_INVALID');
          if (calls) expect(keys.calls).toEqual(calls);
        });
      });

      describe('signature and key', () => {
        it.each(signatureCases)('$name', async ({ token, calls, options }) => {
          const keys = resolver();
          await expectCode(verify(await token(), options, keys), 'TOKEN_INVALID');
          if (calls) expect(keys.calls).toEqual(calls);
        });
      });

      describe('key headers and kid', () => {
        it.each(keyHeaderCases)('$name', async ({ token, calls, options }) => {
          const keys = resolver();
          await expectCode(verify(await token(), options, keys), 'TOKEN_INVALID');
          if (calls) expect(keys.calls).toEqual(calls);
          // Whatever the headers say, the resolver is asked only for a kid, never for a URL or the embedded key.
          for (const call of keys.calls) {
            expect(typeof call).toBe('string');
            expect(call).not.toContain('evil.test');
            expect(call.length).toBeLessThanOrEqual(128);
          }
        });
      });

      describe('header', () => {
        it.each(headerCases)('$name', async ({ token, calls, options }) => {
          const keys = resolver();
          await expectCode(verify(await token(), options, keys), 'TOKEN_INVALID');
          if (calls) expect(keys.calls).toEqual(calls);
        });
      });

      describe('claims', () => {
        it.each(claimCases)('$name', async ({ token, calls, options }) => {
          const keys = resolver();
          await expectCode(verify(await token(), options, keys), 'TOKEN_INVALID');
          if (calls) expect(keys.calls).toEqual(calls);
        });
      });

      it('names the time claim of a genuine token from the future (clock skew), and only then', async () => {
        const early = await expectCode(
          verify(await craft(claims({ nbf: NOW_S + TOLERANCE + 1 }))),
          'TOKEN_INVALID',
        );
        expect(early.claim).toBe('nbf');
        const issuedLater = await expectCode(
          verify(await craft(claims({ iat: NOW_S + TOLERANCE + 1, nbf: NOW_S }))),
          'TOKEN_INVALID',
        );
        expect(issuedLater.claim).toBe('iat');
        // The same from an unknown key says nothing about clocks.
        const forged = await craft(
          claims({ nbf: NOW_S + TOLERANCE + 1 }),
          header({ kid: 'x' }),
          attackerKeys.privateKey,
        );
        expect((await expectCode(verify(forged), 'TOKEN_INVALID')).claim).toBeUndefined();
      });

      it('an expired token with a forged signature is TOKEN_INVALID, never TOKEN_EXPIRED with claims', async () => {
        const forged = editPayload(await realToken(), (p) => {
          p.fid = 'f_someone_else';
        });
        await expectCode(verify(forged, { currentDate: at(3600) }), 'TOKEN_INVALID');
      });

      it('an expired token signed by an unknown key is TOKEN_INVALID', async () => {
        const token = await craft(claims(), header({ kid: 'attacker-key' }), attackerKeys.privateKey);
        await expectCode(verify(token, { currentDate: at(3600) }), 'TOKEN_INVALID');
      });

      it('an expired token with the wrong typ is TOKEN_INVALID', async () => {
        const token = await craft(claims(), header({ typ: 'JWT' }));
        await expectCode(verify(token, { currentDate: at(3600) }), 'TOKEN_INVALID');
      });
    });

    describe('TOKEN_EXPIRED', () => {
      interface ExpiredCase {
        name: string;
        token: () => Promise<string>;
        currentDate: Date;
      }
      const cases: ExpiredCase[] = [
        {
          name: 'exp passed by exactly the tolerance',
          token: () => realToken(),
          currentDate: at(TTL + TOLERANCE),
        },
        {
          name: 'exp passed beyond the tolerance',
          token: () => realToken(),
          currentDate: at(TTL + TOLERANCE + 1),
        },
        { name: 'exp passed long ago', token: () => realToken(), currentDate: at(30 * 86400) },
        {
          name: 'older than maxTokenAge although exp is far in the future',
          token: () => realToken({ ttlSeconds: 365 * 86400 }),
          currentDate: at(MAX_AGE + TOLERANCE + 1),
        },
        {
          name: 'crafted: iat a day ago, exp a day ahead',
          token: () => craft(claims({ iat: NOW_S - 86400, nbf: NOW_S - 86400, exp: NOW_S + 86400 })),
          currentDate: NOW,
        },
      ];

      it.each(cases)('$name', async ({ token, currentDate }) => {
        const error = await expectCode(verify(await token(), { currentDate }), 'TOKEN_EXPIRED');
        expect(error.claims?.fid).toBe(FILE.fid);
        expect(error.claims).toMatchObject({ iss: ISSUER, aud: AUDIENCE, sub: 'user-42' });
      });

      it('still accepts a token whose exp passed by less than the tolerance', async () => {
        await expect(
          verify(await realToken(), { currentDate: at(TTL + TOLERANCE - 1) }),
        ).resolves.toMatchObject({
          fid: FILE.fid,
        });
      });
    });

    describe('key resolver failures', () => {
      it('propagates the error a resolver throws, unchanged', async () => {
        const failure = new Error('keys unavailable');
        const failing: KeyResolver = async () => {
          throw failure;
        };
        const promise = verifyDownloadToken(await realToken(), failing, VERIFY);
        await expect(promise).rejects.toBe(failure);
        await expect(promise).rejects.not.toBeInstanceOf(DownloadTokenError);
      });

      it('propagates a non-Error thrown by the resolver, unchanged', async () => {
        const failing: KeyResolver = async () => {
          throw 'keys unavailable';
        };
        await expect(verifyDownloadToken(await realToken(), failing, VERIFY)).rejects.toBe(
          'keys unavailable',
        );
      });

      it('propagates a jose error thrown by the resolver (e.g. a JWKS fetch timeout), unchanged', async () => {
        // KeyResolver's contract: "any error it throws (keys unavailable) propagates unchanged".
        // A JWKS-backed resolver built on jose throws JOSEError subclasses such as JWKSTimeout;
        // those must surface as "keys unavailable" (503), not as TOKEN_INVALID (403).
        const failure = new errors.JWKSTimeout();
        const failing: KeyResolver = async () => {
          throw failure;
        };
        await expect(verifyDownloadToken(await realToken(), failing, VERIFY)).rejects.toBe(failure);
      });

      it('propagates the error a synchronous resolver throws, unchanged', async () => {
        const failure = new errors.JWKSTimeout();
        const failing: KeyResolver = () => {
          throw failure;
        };
        await expect(verifyDownloadToken(await realToken(), failing, VERIFY)).rejects.toBe(failure);
      });
    });

    // B's resolver returns a key it has at hand without a promise: the same checks apply.
    describe('a synchronous resolver', () => {
      it('verifies with the key it returns', async () => {
        const keys = new Map([[KID, bPublic]]);
        await expect(
          verifyDownloadToken(await realToken(), (kid) => keys.get(kid), VERIFY),
        ).resolves.toMatchObject({ fid: FILE.fid });
      });

      it('no key → TOKEN_INVALID', async () => {
        await expectCode(
          verifyDownloadToken(await realToken(), () => undefined, VERIFY),
          'TOKEN_INVALID',
        );
      });

      it("a key of another algorithm than the token's → TOKEN_INVALID", async () => {
        const other = otherKeys.publicKey;
        await expectCode(
          verifyDownloadToken(await realToken(), () => other, VERIFY),
          'TOKEN_INVALID',
        );
      });
    });
  });
}

for (const alg of TOKEN_ALGORITHMS) await suite(alg);
