/**
 * One token-crypto rate, measured in a process of its own so that it can be pinned like B:
 * `MODE` is `jose` (jose's `jwtVerify` with B's options), `ours` (`verifyDownloadToken`: jose
 * plus the syntax check before and the file claims after), `raw` (node:crypto's verify of the
 * same signature, the physical floor) or `sign` (`signDownloadToken`, as A mints). `INFLIGHT`
 * verifications or signs are kept in flight (1: one at a time). Prints `{ "rate": n, "cpuUs": t }`,
 * `t` the process's CPU time per operation (all its threads).
 * The token is real: minted by `signDownloadToken` for `FILE` with a fresh `ALG` key.
 */
import { createPublicKey, verify } from 'node:crypto';
import {
  type FileClaims,
  signDownloadToken,
  TOKEN_TYPE,
  type TokenAlgorithm,
  verifyDownloadToken,
} from '@sfh/download-token';
import { exportJWK, generateKeyPair, jwtVerify } from 'jose';

const alg = process.env.ALG as TokenAlgorithm;
const mode = process.env.MODE as 'jose' | 'ours' | 'raw' | 'sign';
const inflight = Number(process.env.INFLIGHT ?? 1);
const seconds = Number(process.env.SECONDS ?? 3);
const file = JSON.parse(process.env.FILE as string) as FileClaims;

const ISSUER = 'http://a.bench';
const AUDIENCE = 'http://b.bench';
const { privateKey, publicKey } = await generateKeyPair(alg);
const mintOptions = {
  key: privateKey,
  kid: 'k-bench',
  issuer: ISSUER,
  audience: AUDIENCE,
  subject: 'u',
  ttlSeconds: 300,
};
const { token } = await signDownloadToken(file, mintOptions);
const verifyOptions = {
  algorithms: [alg],
  issuer: ISSUER,
  audience: AUDIENCE,
  maxTokenAgeSeconds: 300,
  clockToleranceSeconds: 5,
};

const [header, payload, signature] = token.split('.') as [string, string, string];
const input = Buffer.from(`${header}.${payload}`);
const sig = Buffer.from(signature, 'base64url');
const publicKeyObject = createPublicKey({ key: (await exportJWK(publicKey)) as never, format: 'jwk' });
const rawKey =
  alg === 'ES256' ? { key: publicKeyObject, dsaEncoding: 'ieee-p1363' as const } : publicKeyObject;
const rawDigest = alg === 'ES256' ? 'sha256' : null;

const once: () => Promise<unknown> = {
  jose: () =>
    jwtVerify(token, publicKey, {
      algorithms: [alg],
      issuer: ISSUER,
      audience: AUDIENCE,
      typ: TOKEN_TYPE,
      requiredClaims: ['exp', 'iat', 'nbf', 'jti', 'sub'],
      maxTokenAge: 300,
      clockTolerance: 5,
    }),
  ours: () => verifyDownloadToken(token, async () => publicKey, verifyOptions),
  raw: async () => {
    if (!verify(rawDigest, input, rawKey, sig)) throw new Error('signature does not verify');
  },
  sign: () => signDownloadToken(file, mintOptions),
}[mode];

/** Operations per second, and the process's CPU time per operation (µs, every thread). */
async function rate(ms: number): Promise<{ rate: number; cpuUs: number }> {
  const start = performance.now();
  const cpu = process.cpuUsage();
  const end = start + ms;
  let n = 0;
  await Promise.all(
    Array.from({ length: inflight }, async () => {
      while (performance.now() < end) {
        await once();
        n++;
      }
    }),
  );
  const used = process.cpuUsage(cpu);
  return { rate: n / ((performance.now() - start) / 1000), cpuUs: (used.user + used.system) / n };
}

await rate(500);
process.stdout.write(`${JSON.stringify(await rate(seconds * 1000))}\n`);
