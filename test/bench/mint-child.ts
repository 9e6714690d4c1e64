/**
 * Mints `COUNT` download tokens exactly as A does (`signDownloadToken`) and writes them to
 * stdout, one a line. The benchmark runs several of these before a measurement, one per core,
 * so that every request of a run can carry a fresh single-use token.
 */
import { type FileClaims, signDownloadToken } from '@sfh/download-token';
import { type CryptoKey, importJWK, type JWK } from 'jose';

const jwk = JSON.parse(process.env.MINT_JWK as string) as JWK;
const file = JSON.parse(process.env.MINT_FILE as string) as FileClaims;
const count = Number(process.env.MINT_COUNT);
const key = (await importJWK(jwk, process.env.MINT_ALG as string)) as CryptoKey;
const options = {
  key,
  kid: process.env.MINT_KID as string,
  issuer: process.env.MINT_ISSUER as string,
  audience: process.env.MINT_AUDIENCE as string,
  subject: 'bench-user',
  ttlSeconds: Number(process.env.MINT_TTL_SECONDS ?? 300),
};

const BATCH = 256;
for (let done = 0; done < count; done += BATCH) {
  const n = Math.min(BATCH, count - done);
  const tokens = await Promise.all(Array.from({ length: n }, () => signDownloadToken(file, options)));
  const text = `${tokens.map((t) => t.token).join('\n')}\n`;
  if (!process.stdout.write(text)) await new Promise((resolve) => process.stdout.once('drain', resolve));
}
