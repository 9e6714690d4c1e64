import { type FileClaims, type SignedToken, signDownloadToken } from '@sfh/download-token';
import fp from 'fastify-plugin';
import type { CryptoKey, JWK } from 'jose';
import { KeyLifecycle, type KeyPolicy } from '../keys/lifecycle.ts';
import { createSigningKey, openSigningKey } from '../keys/material.ts';
import type { SigningKeyRecord } from '../repositories/signing-keys.ts';

declare module 'fastify' {
  interface FastifyInstance {
    tokens: {
      /** Mints a download token for `file` on behalf of user `subject`, with the current key. */
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
  policy: KeyPolicy;
  /** Key-encryption key for the private halves at rest. */
  kek: Buffer | undefined;
  /** How often this replica advances the lifecycle and picks up a new current key. */
  pollMs: number;
}

/** The JWKS entry of a key: public members only, whatever the row holds. */
export const publicJwk = (key: SigningKeyRecord): JWK => ({
  ...key.publicJwk,
  kid: key.kid,
  alg: key.alg,
  use: 'sig',
});

/**
 * A's signing keys. The lifecycle (rotation, retirement, scheduled rotation) advances on a
 * timer in every replica; a Postgres advisory lock lets one at a time act. Each replica imports
 * the current private key once per change and signs with it from memory.
 */
export default fp(
  async (app, options: KeysOptions) => {
    const repo = app.repos.signingKeys;
    const lifecycle = new KeyLifecycle(options.policy, () => createSigningKey(options.kek));
    let signer: { kid: string; key: CryptoKey } | undefined;

    async function loadCurrent() {
      const current = await repo.current();
      if (current && current.kid !== signer?.kid) {
        signer = {
          kid: current.kid,
          key: await openSigningKey(current.privateKey, current.alg, current.kid, options.kek),
        };
        app.log.info({ kid: current.kid, alg: current.alg }, 'signing with key');
        app.stats.signingKeySwitched();
      }
    }

    // At start, wait for the lock: there must be a current key before the first request.
    await repo.locked((keys) => lifecycle.advance(keys, new Date()));
    await loadCurrent();

    let timer: NodeJS.Timeout | undefined;
    const tick = async () => {
      try {
        await repo.locked((keys) => lifecycle.advance(keys, new Date(), signer?.kid), { wait: false });
        await loadCurrent();
      } catch (error) {
        // The database is down, or the new current key does not open (a wrong KEK wrote it):
        // keep signing with the key we have; advance() keeps it published while we do.
        app.log.warn({ err: error }, 'cannot advance the signing keys');
      }
      timer = setTimeout(tick, options.pollMs);
      timer.unref();
    };
    timer = setTimeout(tick, options.pollMs);
    timer.unref();
    app.addHook('onClose', async () => clearTimeout(timer));

    app.decorate('tokens', {
      async mint(file, subject) {
        const { kid, key } = signer as NonNullable<typeof signer>;
        return signDownloadToken(file, {
          key,
          kid,
          issuer: options.issuer,
          audience: options.audience,
          subject,
          ttlSeconds: options.ttlSeconds,
        });
      },
      async jwks() {
        return { keys: (await repo.published()).map(publicJwk) };
      },
    });
  },
  { name: 'keys', dependencies: ['repositories', 'metrics'] },
);
