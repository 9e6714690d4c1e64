/**
 * Every known attack on the download token, as one table (README "How a download
 * works" and "Security model"). Each row is refused with its code, on GET and on HEAD, and touches
 * neither storage nor the replay store: B verifies before it looks at anything.
 *
 * Each row builds its token from a real app's context: a stored file, a second stored file (so
 * an edited `obj` names bytes that really exist) and a genuine token for the first one. A row that
 * wrongly got through would therefore reach storage and download, not fail for another reason.
 */
import { createHmac, createPublicKey, KeyObject, sign } from 'node:crypto';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { type FileClaims, TOKEN_TYPE } from '@sfh/download-token';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import {
  CompactSign,
  type CryptoKey,
  compactVerify,
  decodeJwt,
  generateKeyPair,
  importJWK,
  type JWTPayload,
} from 'jose';
import { nanoid } from 'nanoid';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { AUDIENCE, buildTestApp, createKey, createUnknownKey, ISSUER, SUBJECT, signRaw } from './helpers.ts';

const TEN = Buffer.from('0123456789');
const OTHER = Buffer.from('another file, same owner or not');

/** B's signing key (published in the JWKS file of every app here) and keys B has never seen. */
const KEY = await createKey('k-real');
const ATTACKER = await createUnknownKey('k-attacker');
const ATTACKER_AS_REAL_KID = await createUnknownKey(KEY.kid);
const ES256 = await generateKeyPair('ES256');
const RS256 = await generateKeyPair('RS256');
const PS256 = await generateKeyPair('PS256');

interface Context {
  /** A stored file and a genuine, unused token for it. */
  file: FileClaims;
  real: string;
  /** Another stored file: an edited `obj` that would resolve to real bytes. */
  other: FileClaims;
  /** Where an attacker serves key material (`jku`, `x5u`); must never be asked. */
  attackerOrigin: string;
}

interface Row {
  name: string;
  token: (ctx: Context) => string | Promise<string>;
  status: number;
  error: string;
}

// --- token surgery --------------------------------------------------------------------------

const b64 = (bytes: Uint8Array | string) => Buffer.from(bytes).toString('base64url');
const segment = (value: unknown) => b64(JSON.stringify(value));
const split = (token: string) => token.split('.') as [string, string, string];
const headerOf = (token: string) =>
  JSON.parse(Buffer.from(split(token)[0], 'base64url').toString()) as Record<string, unknown>;
const nowSeconds = () => Math.floor(Date.now() / 1000);

/** The claims A would sign at `iat` (seconds), with `overrides` on top. */
function claims(file: FileClaims, iat = nowSeconds(), overrides: Record<string, unknown> = {}) {
  return {
    ...file,
    iss: ISSUER,
    aud: AUDIENCE,
    sub: SUBJECT,
    jti: nanoid(),
    iat,
    nbf: iat - 5,
    exp: iat + 60,
    ...overrides,
  };
}

/** A token signed with the real key, whose payload lacks `claim`. */
function without(claim: string) {
  return ({ file }: Context) => {
    const payload: Record<string, unknown> = claims(file);
    delete payload[claim];
    return signRaw(payload, KEY);
  };
}

/** The real token with `edit` applied to its payload and the original signature kept. */
function edited(edit: (payload: JWTPayload, ctx: Context) => JWTPayload) {
  return (ctx: Context) => {
    const [header, , signature] = split(ctx.real);
    return `${header}.${segment(edit(decodeJwt(ctx.real), ctx))}.${signature}`;
  };
}

/** The real token's header and payload with another signature. */
function resigned(signature: (bytes: Buffer) => Buffer | string) {
  return ({ real }: Context) => {
    const [header, payload, original] = split(real);
    const next = signature(Buffer.from(original, 'base64url'));
    return `${header}.${payload}.${typeof next === 'string' ? next : b64(next)}`;
  };
}

/** The real payload under `header` (as given, nothing added), with an empty signature. */
function unsigned(header: Record<string, unknown>) {
  return ({ real }: Context) => `${segment(header)}.${split(real)[1]}.`;
}

/** The real payload under an HS256 header, MACed with `secret` (the public key in some shape). */
function hmacWith(secret: () => Promise<Buffer | string>) {
  return async ({ real }: Context) => {
    const input = `${segment({ alg: 'HS256', kid: KEY.kid, typ: TOKEN_TYPE })}.${split(real)[1]}`;
    return `${input}.${createHmac('sha256', await secret())
      .update(input)
      .digest('base64url')}`;
  };
}

/** The real payload under a foreign algorithm, signed by a matching key of that algorithm. */
function foreignAlg(alg: string, privateKey: CryptoKey) {
  return ({ real }: Context) =>
    new CompactSign(Buffer.from(split(real)[1], 'base64url'))
      .setProtectedHeader({ alg, kid: KEY.kid, typ: TOKEN_TYPE })
      .sign(privateKey);
}

/**
 * Signs `header` and an already encoded payload segment with the real key, byte by byte (jose
 * refuses to produce some of these headers, such as an unknown `crit`).
 */
function signByHand(header: Record<string, unknown>, payloadSegment: string): string {
  const input = `${segment(header)}.${payloadSegment}`;
  const signature = sign(null, Buffer.from(input), KeyObject.from(KEY.privateKey as never));
  return `${input}.${b64(signature)}`;
}

/** The genuine JWKS entry B reads, as an attacker downloads it from A. */
const publishedJwk = () => ({ ...KEY.publicJwk, kid: KEY.kid, alg: 'EdDSA', use: 'sig' });

const ZERO_SIGNATURE = b64(Buffer.alloc(64));

// --- the table --------------------------------------------------------------------------------

const INVALID = { status: 403, error: 'TOKEN_INVALID' } as const;
const EXPIRED = { status: 403, error: 'TOKEN_EXPIRED' } as const;
const MALFORMED = { status: 400, error: 'TOKEN_MALFORMED' } as const;

const rows: Row[] = [
  // alg none, in every spelling: no signature at all.
  ...['none', 'None', 'NONE', 'nOnE'].map(
    (alg): Row => ({
      name: `alg ${alg} with an empty signature`,
      token: unsigned({ alg, kid: KEY.kid, typ: TOKEN_TYPE }),
      ...INVALID,
    }),
  ),
  {
    name: 'alg none without a kid',
    token: unsigned({ alg: 'none', typ: TOKEN_TYPE }),
    ...INVALID,
  },
  {
    name: 'alg none keeping the genuine signature',
    token: ({ real }) => {
      const [, payload, signature] = split(real);
      return `${segment({ alg: 'none', kid: KEY.kid, typ: TOKEN_TYPE })}.${payload}.${signature}`;
    },
    ...INVALID,
  },

  // Algorithm confusion: B's public key used as an HMAC secret.
  {
    name: 'HS256 keyed with the public JWK (JSON as published)',
    token: hmacWith(async () => JSON.stringify(publishedJwk())),
    ...INVALID,
  },
  {
    name: 'HS256 keyed with the public JWK (JSON of the bare key)',
    token: hmacWith(async () => JSON.stringify(KEY.publicJwk)),
    ...INVALID,
  },
  {
    name: 'HS256 keyed with the raw public key bytes (x)',
    token: hmacWith(async () => Buffer.from(KEY.publicJwk.x as string, 'base64url')),
    ...INVALID,
  },
  {
    name: 'HS256 keyed with the base64url x string',
    token: hmacWith(async () => KEY.publicJwk.x as string),
    ...INVALID,
  },
  {
    name: 'HS256 keyed with the SPKI PEM of the public key',
    token: hmacWith(async () =>
      String(
        createPublicKey({ key: KEY.publicJwk as never, format: 'jwk' }).export({
          type: 'spki',
          format: 'pem',
        }),
      ),
    ),
    ...INVALID,
  },

  // Damaged signatures.
  { name: 'stripped signature (header.payload.)', token: resigned(() => ''), ...INVALID },
  {
    name: 'truncated signature (last 10 characters cut)',
    token: ({ real }) => real.slice(0, -10),
    ...INVALID,
  },
  {
    name: 'truncated signature (half of the bytes)',
    token: resigned((sig) => sig.subarray(0, 32)),
    ...INVALID,
  },
  {
    name: 'bit-flipped signature (first byte)',
    token: resigned((sig) => Buffer.from(sig.map((byte, i) => (i === 0 ? byte ^ 0x01 : byte)))),
    ...INVALID,
  },
  {
    name: 'bit-flipped signature (last byte)',
    token: resigned((sig) => Buffer.from(sig.map((byte, i) => (i === sig.length - 1 ? byte ^ 0x80 : byte)))),
    ...INVALID,
  },
  { name: 'all-zero 64-byte signature (EdDSA header)', token: resigned(() => ZERO_SIGNATURE), ...INVALID },
  {
    name: 'all-zero 64-byte signature under ES256 (CVE-2022-21449 "psychic signature")',
    token: ({ real }) =>
      `${segment({ alg: 'ES256', kid: KEY.kid, typ: TOKEN_TYPE })}.${split(real)[1]}.${ZERO_SIGNATURE}`,
    ...INVALID,
  },

  // Edited claims, original signature.
  { name: 'edited size, old signature', token: edited((p) => ({ ...p, size: 1 })), ...INVALID },
  {
    name: 'edited obj (another stored file), old signature',
    token: edited((p, { other }) => ({ ...p, obj: other.obj, size: other.size, sha256: other.sha256 })),
    ...INVALID,
  },
  { name: 'edited sub, old signature', token: edited((p) => ({ ...p, sub: 'admin' })), ...INVALID },
  {
    name: 'edited exp (a day later), old signature',
    token: edited((p) => ({ ...p, exp: (p.exp as number) + 86_400 })),
    ...INVALID,
  },
  {
    name: 're-serialized payload (same claims, other key order), old signature',
    token: edited((p) => Object.fromEntries(Object.entries(p).reverse())),
    ...INVALID,
  },

  // Keys B does not trust.
  {
    name: 'valid signature from a key not in the JWKS (its own kid)',
    token: ({ file }) => signRaw(claims(file), ATTACKER),
    ...INVALID,
  },
  {
    name: 'valid signature from a key not in the JWKS (the real kid)',
    token: ({ file }) => signRaw(claims(file), ATTACKER_AS_REAL_KID),
    ...INVALID,
  },
  {
    name: 'jku header pointing at the attacker’s JWKS (attacker-signed, real kid)',
    token: ({ file, attackerOrigin }) =>
      signRaw(claims(file), ATTACKER_AS_REAL_KID, { jku: `${attackerOrigin}/jwks.json` }),
    ...INVALID,
  },
  {
    name: 'jku header with the attacker’s own kid',
    token: ({ file, attackerOrigin }) =>
      signRaw(claims(file), ATTACKER, { jku: `${attackerOrigin}/jwks.json` }),
    ...INVALID,
  },
  {
    name: 'x5u header pointing at the attacker’s certificate (attacker-signed, real kid)',
    token: ({ file, attackerOrigin }) =>
      signRaw(claims(file), ATTACKER_AS_REAL_KID, { x5u: `${attackerOrigin}/cert.pem` }),
    ...INVALID,
  },
  {
    name: 'embedded jwk header with the attacker’s key (real kid)',
    token: ({ file }) => signRaw(claims(file), ATTACKER_AS_REAL_KID, { jwk: ATTACKER.publicJwk }),
    ...INVALID,
  },
  {
    name: 'embedded jwk header with the attacker’s key (no kid)',
    token: ({ file }) =>
      new CompactSign(Buffer.from(JSON.stringify(claims(file))))
        .setProtectedHeader({ alg: 'EdDSA', typ: TOKEN_TYPE, jwk: ATTACKER.publicJwk })
        .sign(ATTACKER.privateKey),
    ...INVALID,
  },

  // Hostile kid values (signed with the real key: only the kid is wrong).
  {
    name: "kid '../../etc/passwd'",
    token: ({ file }) => signRaw(claims(file), KEY, { kid: '../../etc/passwd' }),
    ...INVALID,
  },
  {
    name: 'kid "\' OR 1=1 --"',
    token: ({ file }) => signRaw(claims(file), KEY, { kid: "' OR 1=1 --" }),
    ...INVALID,
  },
  {
    name: 'kid 2 KB long (token under 4096 characters)',
    token: async ({ file }) => {
      const token = await signRaw(claims(file), KEY, { kid: 'k'.repeat(2048) });
      expect(token.length).toBeLessThanOrEqual(4096);
      return token;
    },
    ...INVALID,
  },
  {
    name: 'kid 10 KB long (token over 4096 characters)',
    token: async ({ file }) => {
      const token = await signRaw(claims(file), KEY, { kid: 'k'.repeat(10 * 1024) });
      expect(token.length).toBeGreaterThan(4096);
      return token;
    },
    ...MALFORMED,
  },
  { name: 'kid empty', token: ({ file }) => signRaw(claims(file), KEY, { kid: '' }), ...INVALID },
  { name: 'kid a number', token: ({ file }) => signRaw(claims(file), KEY, { kid: 1 }), ...INVALID },
  {
    name: 'kid missing',
    token: ({ file }) =>
      new CompactSign(Buffer.from(JSON.stringify(claims(file))))
        .setProtectedHeader({ alg: 'EdDSA', typ: TOKEN_TYPE })
        .sign(KEY.privateKey),
    ...INVALID,
  },

  // Algorithms outside the allowlist, each signed by a matching key.
  { name: 'alg ES256 (outside the allowlist)', token: foreignAlg('ES256', ES256.privateKey), ...INVALID },
  { name: 'alg RS256 (outside the allowlist)', token: foreignAlg('RS256', RS256.privateKey), ...INVALID },
  { name: 'alg PS256 (outside the allowlist)', token: foreignAlg('PS256', PS256.privateKey), ...INVALID },
  {
    name: 'alg Ed25519 (the real key under a name not on the allowlist)',
    token: foreignAlg('Ed25519', KEY.privateKey),
    ...INVALID,
  },

  // typ.
  {
    name: 'typ missing',
    token: ({ file }) =>
      new CompactSign(Buffer.from(JSON.stringify(claims(file))))
        .setProtectedHeader({ alg: 'EdDSA', kid: KEY.kid })
        .sign(KEY.privateKey),
    ...INVALID,
  },
  { name: "typ 'JWT'", token: ({ file }) => signRaw(claims(file), KEY, { typ: 'JWT' }), ...INVALID },
  { name: "typ 'at+jwt'", token: ({ file }) => signRaw(claims(file), KEY, { typ: 'at+jwt' }), ...INVALID },

  // iss and aud.
  {
    name: 'iss wrong',
    token: ({ file }) => signRaw(claims(file, undefined, { iss: 'http://evil.test' }), KEY),
    ...INVALID,
  },
  { name: 'iss missing', token: without('iss'), ...INVALID },
  {
    name: 'aud wrong',
    token: ({ file }) => signRaw(claims(file, undefined, { aud: 'http://evil.test' }), KEY),
    ...INVALID,
  },
  { name: 'aud missing', token: without('aud'), ...INVALID },

  // Required claims.
  ...['exp', 'iat', 'jti', 'sub', 'nbf'].map(
    (claim): Row => ({ name: `${claim} missing`, token: without(claim), ...INVALID }),
  ),
  ...['fid', 'obj', 'name', 'ctype', 'size', 'sha256'].map(
    (claim): Row => ({ name: `file claim ${claim} missing`, token: without(claim), ...INVALID }),
  ),

  // Time.
  {
    name: 'expired (exp 9 minutes ago)',
    token: ({ file }) => signRaw(claims(file, nowSeconds() - 600), KEY),
    ...EXPIRED,
  },
  {
    name: 'nbf 60 s in the future',
    token: ({ file }) => signRaw(claims(file, undefined, { nbf: nowSeconds() + 60 }), KEY),
    ...INVALID,
  },
  {
    name: 'iat 60 s in the future',
    token: ({ file }) => {
      const now = nowSeconds();
      return signRaw(claims(file, now + 60, { nbf: now - 5, exp: now + 120 }), KEY);
    },
    ...INVALID,
  },
  {
    name: 'older than TOKEN_MAX_AGE_SECONDS (iat 400 s ago) with a far exp',
    token: ({ file }) => {
      const now = nowSeconds();
      return signRaw(claims(file, now - 400, { exp: now + 86_400 }), KEY);
    },
    ...EXPIRED,
  },

  // crit.
  {
    name: "unknown crit ['foo']",
    token: ({ file }) =>
      signByHand(
        { alg: 'EdDSA', kid: KEY.kid, typ: TOKEN_TYPE, crit: ['foo'], foo: 'bar' },
        segment(claims(file)),
      ),
    ...INVALID,
  },
  {
    name: "crit ['foo'] without the parameter",
    token: ({ file }) =>
      signByHand({ alg: 'EdDSA', kid: KEY.kid, typ: TOKEN_TYPE, crit: ['foo'] }, segment(claims(file))),
    ...INVALID,
  },
  {
    name: "crit ['b64'] with b64: false (unencoded payload)",
    // With b64: false the signing input is the payload segment as it stands, so this signature
    // is genuine for an unencoded payload; jwtVerify must refuse unencoded JWTs.
    token: ({ file }) =>
      signByHand(
        { alg: 'EdDSA', kid: KEY.kid, typ: TOKEN_TYPE, b64: false, crit: ['b64'] },
        segment(claims(file)),
      ),
    ...INVALID,
  },

  // Not a compact JWS, or too long: 400 before any parsing.
  { name: 'token over 4 KB (5000 characters)', token: () => 'a'.repeat(5000), ...MALFORMED },
  {
    name: 'genuine-looking token padded past 4096 characters',
    token: ({ real }) => {
      const [header, payload, signature] = split(real);
      return `${header}.${payload}${'A'.repeat(4100)}.${signature}`;
    },
    ...MALFORMED,
  },
  { name: "'a.b' (two segments)", token: () => 'a.b', ...MALFORMED },
  { name: "'abc' (one segment)", token: () => 'abc', ...MALFORMED },
  { name: "'a.b.c.d' (four segments)", token: () => 'a.b.c.d', ...MALFORMED },
  {
    name: 'a genuine token with a fourth segment',
    token: ({ real }) => `${real}.${split(real)[2]}`,
    ...MALFORMED,
  },
  { name: 'segments that are not JSON', token: () => 'YWJj.YWJj.YWJj', ...MALFORMED },
  {
    name: 'header that is a JSON array',
    token: ({ real }) => `${segment(['EdDSA'])}.${split(real)[1]}.${split(real)[2]}`,
    ...MALFORMED,
  },
  {
    name: 'payload that is JSON null',
    token: ({ real }) => `${split(real)[0]}.${segment(null)}.${split(real)[2]}`,
    ...MALFORMED,
  },
  {
    name: 'base64 padding and standard-alphabet characters',
    token: ({ real }) => `${split(real)[0]}=.${split(real)[1]}.${split(real)[2]}`,
    ...MALFORMED,
  },
];

// --- the suite --------------------------------------------------------------------------------

/** Attacker-controlled key server. B must never ask it for anything. */
let attackerOrigin = '';
const attackerRequests: string[] = [];
const attackerServer = createServer((request, response) => {
  attackerRequests.push(String(request.url));
  response.setHeader('content-type', 'application/json');
  response.end(JSON.stringify({ keys: [{ ...ATTACKER.publicJwk, kid: KEY.kid, alg: 'EdDSA', use: 'sig' }] }));
});

beforeAll(async () => {
  attackerServer.listen(0, '127.0.0.1');
  await once(attackerServer, 'listening');
  attackerOrigin = `http://127.0.0.1:${(attackerServer.address() as AddressInfo).port}`;
});

afterAll(async () => {
  attackerServer.close();
  await once(attackerServer, 'close');
});

/** An app publishing KEY, a stored file with a genuine token, another stored file, and spies. */
async function setUp() {
  const t = await buildTestApp({}, { key: KEY });
  const file = await t.putFile(TEN);
  const other = await t.putFile(OTHER, { name: 'other.txt', ctype: 'text/plain' });
  const real = await t.mint(file);
  const spies = {
    read: vi.spyOn(t.app.storage, 'read'),
    reserve: vi.spyOn(t.app.replayStore, 'reserve'),
    usage: vi.spyOn(t.app.replayStore, 'usage'),
  };
  const ctx: Context = { file, real, other, attackerOrigin };
  return { ...t, ctx, spies };
}

function request(
  app: FastifyInstance,
  method: 'GET' | 'HEAD',
  token: string,
): Promise<LightMyRequestResponse> {
  return app.inject({ method, url: `/d/${token}`, headers: { accept: 'application/json' } });
}

describe('token attacks: refused with the right code, before storage and the replay store', () => {
  it('control: a genuine token does reach storage and the replay store (so the spies can see)', async () => {
    const { app, ctx, spies } = await setUp();
    const head = await request(app, 'HEAD', ctx.real);
    expect(head.statusCode).toBe(200);
    expect(spies.read).toHaveBeenCalledTimes(1);
    expect(spies.usage).toHaveBeenCalled();
    const get = await request(app, 'GET', ctx.real);
    expect(get.statusCode).toBe(200);
    expect(get.rawPayload.equals(TEN)).toBe(true);
    expect(spies.reserve).toHaveBeenCalledTimes(1);
    expect(spies.read).toHaveBeenCalledTimes(2);
  });

  it.each(rows)('$name → $status $error', async (row) => {
    const { app, ctx, spies } = await setUp();
    const token = await row.token(ctx);

    const get = await request(app, 'GET', token);
    expect(get.statusCode, get.body).toBe(row.status);
    expect(String(get.headers['content-type'])).toMatch(/^application\/json/);
    expect(get.json()).toMatchObject({ error: row.error });
    expect(get.rawPayload.includes(TEN)).toBe(false);

    const head = await request(app, 'HEAD', token);
    expect(head.statusCode).toBe(row.status);
    expect(head.rawPayload.length).toBe(0);

    for (const [name, spy] of Object.entries(spies)) expect(spy, name).not.toHaveBeenCalled();
    expect(attackerRequests).toEqual([]);
    // The genuine token of the same file is untouched by the attempt.
    expect(await app.replayStore.usage(decodeJwt(ctx.real).jti as string)).toBeUndefined();
  });

  it('the header surgery above really produced the headers it names', async () => {
    // Guards the table against a helper that silently signs something else.
    const { ctx } = await setUp();
    const byName = (name: string) => rows.find((row) => row.name === name) as Row;
    expect(headerOf(await byName('alg nOnE with an empty signature').token(ctx))).toMatchObject({
      alg: 'nOnE',
    });
    expect(headerOf(await byName('alg ES256 (outside the allowlist)').token(ctx))).toMatchObject({
      alg: 'ES256',
      kid: KEY.kid,
    });
    const jwkHeader = headerOf(
      await byName('embedded jwk header with the attacker’s key (real kid)').token(ctx),
    );
    expect(jwkHeader.jwk).toMatchObject({ x: ATTACKER.publicJwk.x });
    expect(headerOf(await byName('typ missing').token(ctx))).not.toHaveProperty('typ');
    // The "key not in the JWKS" signature is genuine: it verifies under the attacker's key.
    const foreign = await byName('valid signature from a key not in the JWKS (the real kid)').token(ctx);
    const attackerPublic = await importJWK(ATTACKER_AS_REAL_KID.publicJwk, 'EdDSA');
    await expect(compactVerify(foreign, attackerPublic)).resolves.toBeDefined();
    // And the HS256 rows carry an HMAC over their own signing input.
    expect(headerOf(await byName('HS256 keyed with the raw public key bytes (x)').token(ctx)).alg).toBe(
      'HS256',
    );
  });

  it('a forged token carrying a real token’s jti never burns it (verify before claim)', async () => {
    const { app, ctx, spies } = await setUp();
    const jti = decodeJwt(ctx.real).jti as string;
    const forgeries = [
      // An attacker's signature under the real kid, the real claims.
      await signRaw({ ...decodeJwt(ctx.real) }, ATTACKER_AS_REAL_KID),
      // alg none with the real payload.
      unsigned({ alg: 'none', kid: KEY.kid, typ: TOKEN_TYPE })(ctx),
      // The real signature over claims edited to another file.
      edited((p, { other }) => ({ ...p, obj: other.obj, size: other.size }))(ctx),
      // A flipped bit in the real signature.
      resigned((sig) => Buffer.from(sig.map((byte, i) => (i === 5 ? byte ^ 0x10 : byte))))(ctx),
    ];
    for (const forged of forgeries) {
      expect(decodeJwt(forged).jti).toBe(jti);
      for (const method of ['GET', 'HEAD', 'GET'] as const) {
        const res = await request(app, method, forged);
        expect(res.statusCode, `${method} ${forged}`).toBe(403);
      }
    }
    for (const [name, spy] of Object.entries(spies)) expect(spy, name).not.toHaveBeenCalled();
    expect(await app.replayStore.usage(jti)).toBeUndefined();

    const res = await request(app, 'GET', ctx.real);
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(TEN)).toBe(true);
    expect(spies.reserve).toHaveBeenCalledTimes(1);
    // And only now is it spent.
    expect((await request(app, 'GET', ctx.real)).statusCode).toBe(410);
  });
});
