import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type CryptoKey, exportJWK, generateKeyPair, type JWK } from 'jose';
import { nanoid } from 'nanoid';

export interface SigningKey {
  kid: string;
  privateKey: CryptoKey;
  privateJwk: JWK;
  /** The public half as a JWKS, for B's JWKS_FILE. */
  jwksFile: string;
}

/** A fresh Ed25519 key, as A would make one, its public half published in `dir/jwks.json`. */
export async function signingKey(dir: string): Promise<SigningKey> {
  const { privateKey, publicKey } = await generateKeyPair('EdDSA', { extractable: true });
  const kid = `k-${nanoid(8)}`;
  const jwksFile = join(dir, 'jwks.json');
  await writeFile(
    jwksFile,
    JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid, alg: 'EdDSA', use: 'sig' }] }),
  );
  return { kid, privateKey, privateJwk: await exportJWK(privateKey), jwksFile };
}
