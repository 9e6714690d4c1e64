import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { isTokenAlgorithm, TOKEN_ALGORITHM } from '@sfh/download-token';
import {
  type CryptoKey,
  calculateJwkThumbprint,
  exportJWK,
  generateKeyPair,
  importJWK,
  type JWK,
} from 'jose';

/** A new signing key: its public JWK to publish and its private half, sealed for the database. */
export interface NewSigningKey {
  kid: string;
  alg: string;
  publicJwk: JWK;
  privateKey: string;
}

const SEALED_PREFIX = 'aes256gcm.';

/**
 * Generates a key for `TOKEN_ALGORITHM`, which the row records. Its kid is the RFC 7638 thumbprint, a name derived from the key
 * material itself. With a key-encryption key the private half is sealed with AES-256-GCM, so a
 * database dump alone cannot mint tokens.
 */
export async function createSigningKey(kek: Buffer | undefined): Promise<NewSigningKey> {
  const { publicKey, privateKey } = await generateKeyPair(TOKEN_ALGORITHM, { extractable: true });
  const publicJwk = await exportJWK(publicKey);
  const kid = await calculateJwkThumbprint(publicJwk);
  const privateJson = JSON.stringify(await exportJWK(privateKey));
  return {
    kid,
    alg: TOKEN_ALGORITHM,
    publicJwk,
    privateKey: kek ? seal(privateJson, kek, kid) : privateJson,
  };
}

/**
 * Imports a stored private key (sealed or, in development without a KEK, plain) with jose, for
 * the algorithm its row records: keys made before the algorithm changed keep signing as they were
 * made until they retire.
 */
export async function openSigningKey(
  stored: string,
  alg: string,
  kid: string,
  kek: Buffer | undefined,
): Promise<CryptoKey> {
  let json = stored;
  if (stored.startsWith(SEALED_PREFIX)) {
    if (!kek) throw new Error(`Signing key ${kid} is encrypted; set KEY_ENCRYPTION_KEY`);
    json = unseal(stored, kek, kid);
  } else if (kek) {
    // With a key-encryption key configured, a plain private key is one someone wrote without it
    // (a CLI run without the KEK): never sign with it.
    throw new Error(
      `Signing key ${kid} is stored unencrypted although KEY_ENCRYPTION_KEY is set; revoke it (npm run keys -- revoke ${kid}, with the KEK) and a sealed key takes over`,
    );
  }
  if (!isTokenAlgorithm(alg)) throw new Error(`Signing key ${kid} is for ${alg}, which A does not sign with`);
  try {
    return (await importJWK(JSON.parse(json), alg)) as CryptoKey;
  } catch (error) {
    throw new Error(`Signing key ${kid} is not a private ${alg} key`, { cause: error });
  }
}

// The kid is authenticated data: a sealed key copied onto another row does not open.
function seal(plain: string, kek: Buffer, kid: string): string {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', kek, iv).setAAD(Buffer.from(kid));
  const body = Buffer.concat([cipher.update(plain, 'utf8'), cipher.final(), cipher.getAuthTag()]);
  return `${SEALED_PREFIX}${iv.toString('base64url')}.${body.toString('base64url')}`;
}

function unseal(sealed: string, kek: Buffer, kid: string): string {
  const [iv = '', body = ''] = sealed.slice(SEALED_PREFIX.length).split('.');
  const bytes = Buffer.from(body, 'base64url');
  const decipher = createDecipheriv('aes-256-gcm', kek, Buffer.from(iv, 'base64url')).setAAD(
    Buffer.from(kid),
  );
  decipher.setAuthTag(bytes.subarray(-16));
  try {
    return Buffer.concat([decipher.update(bytes.subarray(0, -16)), decipher.final()]).toString('utf8');
  } catch (error) {
    throw new Error(`Cannot decrypt signing key ${kid}: wrong KEY_ENCRYPTION_KEY?`, { cause: error });
  }
}

/**
 * Proves that `kek` opens every stored private key (the keys CLI runs this before it writes):
 * a missing or wrong KEK would leave keys A cannot use, or plain keys beside sealed ones.
 */
export function checkKeyEncryption(
  keys: { kid: string; alg: string; privateKey: string }[],
  kek: Buffer | undefined,
): void {
  for (const key of keys) {
    // Revoked keys have no private half left.
    if (key.privateKey !== '') openSigningKey(key.privateKey, key.alg, key.kid, kek);
  }
}
