import { type FileClaims, type SignedToken, signDownloadToken, TOKEN_ALGORITHM } from '@sfh/download-token';
import fp from 'fastify-plugin';
import {
  type CryptoKey,
  calculateJwkThumbprint,
  exportJWK,
  generateKeyPair,
  importJWK,
  type JWK,
} from 'jose';

declare module 'fastify' {
  interface FastifyInstance {
    tokens: {
      /** Mints a download token for `file` on behalf of user `subject`. */
      mint(file: FileClaims, subject: string): Promise<SignedToken>;
      /** The public key set B verifies against (public members only). */
      jwks(): Promise<{ keys: JWK[] }>;
    };
  }
}

export interface KeysOptions {
  issuer: string;
  audience: string;
  ttlSeconds: number;
}

/**
 * A's signing keys: kept in the database, the current one imported once and held in memory.
 * On first start there is no key, so one is created and made current.
 */
export default fp(
  async (app, options: KeysOptions) => {
    const record = await app.repos.signingKeys.ensureCurrent(createSigningKey);
    const current = {
      kid: record.kid,
      key: (await importJWK(JSON.parse(record.privateKey) as JWK, record.alg)) as CryptoKey,
    };

    app.decorate('tokens', {
      mint: (file, subject) =>
        signDownloadToken(file, {
          key: current.key,
          kid: current.kid,
          issuer: options.issuer,
          audience: options.audience,
          subject,
          ttlSeconds: options.ttlSeconds,
        }),
      async jwks() {
        const published = await app.repos.signingKeys.published();
        return { keys: published.map((k) => ({ ...k.publicJwk, kid: k.kid, alg: k.alg, use: 'sig' })) };
      },
    });
  },
  { name: 'keys', dependencies: ['repositories'] },
);

async function createSigningKey() {
  const { publicKey, privateKey } = await generateKeyPair(TOKEN_ALGORITHM, { extractable: true });
  const publicJwk = await exportJWK(publicKey);
  // The RFC 7638 thumbprint: a kid that names the key material itself.
  const kid = await calculateJwkThumbprint(publicJwk);
  return { kid, alg: TOKEN_ALGORITHM, publicJwk, privateKey: JSON.stringify(await exportJWK(privateKey)) };
}
