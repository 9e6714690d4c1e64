import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TOKEN_ALGORITHM, type TokenAlgorithm } from '@sfh/download-token';
import { type CryptoKey, exportJWK, generateKeyPair, type JWK } from 'jose';
import { nanoid } from 'nanoid';

export interface SigningKey {
  kid: string;
  alg: TokenAlgorithm;
  privateKey: CryptoKey;
  privateJwk: JWK;
  /** The public half as a JWKS, for B's JWKS_FILE. */
  jwksFile: string;
}

/** A fresh key (A's algorithm unless told), as A would make one, its public half in `dir/jwks.json`. */
export async function signingKey(dir: string, alg: TokenAlgorithm = TOKEN_ALGORITHM): Promise<SigningKey> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  const kid = `k-${nanoid(8)}`;
  const jwksFile = join(dir, 'jwks.json');
  await writeFile(
    jwksFile,
    JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid, alg, use: 'sig' }] }),
    // 0644 whatever the umask: B refuses a key file that group or others may write.
    { mode: 0o644 },
  );
  return { kid, alg, privateKey, privateJwk: await exportJWK(privateKey), jwksFile };
}
