import type { KeyQueries, SigningKeyRecord } from '../repositories/signing-keys.ts';
import type { NewSigningKey } from './material.ts';

/** The timing rules of the key lifecycle (README, "Signing keys"). */
export interface KeyPolicy {
  /** How long a `next` key is published before it signs: B must have fetched it by then. */
  activationDelayMs: number;
  /** How long a `previous` key stays published: until every token it signed has expired. */
  retentionMs: number;
  /** Scheduled rotation: a current key older than this gets a successor (0: never). */
  rotationIntervalMs: number;
}

/**
 * The pure decisions of the lifecycle, run inside `signingKeys.locked()` so one process at a
 * time applies them. Each step is idempotent: any replica may run it any number of times.
 */
export class KeyLifecycle {
  constructor(
    readonly policy: KeyPolicy,
    readonly createKey: () => Promise<NewSigningKey>,
  ) {}

  /** Publishes a new key as `next`; it starts signing `activationDelayMs` from now. */
  async rotate(keys: KeyQueries, now: Date): Promise<SigningKeyRecord> {
    return keys.insert(
      await this.createKey(),
      'next',
      now,
      new Date(now.getTime() + this.policy.activationDelayMs),
    );
  }

  /**
   * Moves keys along `next → current → previous → removed` as their times come, starts a
   * scheduled rotation when the current key is old, and makes sure some key is current. The key
   * this replica still signs with (`signingKid`: it could not open its successor) is never
   * removed, so its tokens keep verifying.
   */
  async advance(keys: KeyQueries, now: Date, signingKid?: string): Promise<void> {
    const ready = await keys.firstNext(now);
    if (ready) await keys.promote(ready.kid, now, this.#retiresAt(now));
    await keys.deleteRetired(now, signingKid);
    const current = await keys.current();
    if (!current) {
      // First start, or every signing key revoked: sign at once with a fresh key. B learns it
      // through its unknown-kid refetch; this is the one case where waiting would stop minting.
      await keys.insert(await this.createKey(), 'current', now, now);
    } else if (this.#rotationDue(current, now) && !(await keys.firstNext())) {
      await this.rotate(keys, now);
    }
  }

  /**
   * Revokes a key at once. If it was signing, the first next key takes over at once, or a new
   * key does, so minting never stops. Returns the revoked key's previous state, or `undefined`
   * if there was no such unrevoked key.
   */
  async revoke(keys: KeyQueries, kid: string, now: Date) {
    const was = await keys.revoke(kid, now);
    if (was === 'current') {
      const successor = await keys.firstNext();
      if (successor) await keys.promote(successor.kid, now, this.#retiresAt(now));
      else await keys.insert(await this.createKey(), 'current', now, now);
    }
    return was;
  }

  #retiresAt(now: Date): Date {
    return new Date(now.getTime() + this.policy.retentionMs);
  }

  #rotationDue(current: SigningKeyRecord, now: Date): boolean {
    const since = (current.activatedAt ?? current.createdAt).getTime();
    return this.policy.rotationIntervalMs > 0 && now.getTime() - since >= this.policy.rotationIntervalMs;
  }
}
