/**
 * The contract every `ReplayStore` must pass (src/replay-store.ts; design.md "Single use"):
 * one winner per jti however many callers race, claims independent per jti, expiry at
 * `keepUntil`. Implementations call `replayStoreContract(name, open)` from their own test file.
 */
import { nanoid } from 'nanoid';
import { afterEach, describe, expect, it, onTestFinished, vi } from 'vitest';
import type { ReplayStore } from '../src/replay-store.ts';

export interface ContractOptions {
  /**
   * The store keeps time on another machine (Redis), so moving this process's clock does not
   * expire anything: the expiry test then waits (100 ms) instead of faking `Date`.
   */
  realClock?: boolean;
}

/** A jti of the shape A mints (nanoid, 21 characters). */
const newJti = () => nanoid();
const MINUTE = 60_000;

export function replayStoreContract(
  name: string,
  open: () => Promise<ReplayStore>,
  options: ContractOptions = {},
): void {
  describe(`ReplayStore contract: ${name}`, () => {
    afterEach(() => {
      vi.useRealTimers();
    });

    /** A store closed when the test finishes. */
    async function fresh(): Promise<ReplayStore> {
      const store = await open();
      onTestFinished(() => store.close());
      return store;
    }

    it('the first claim of a jti wins, the second loses', async () => {
      const store = await fresh();
      const jti = newJti();
      expect(await store.claim(jti, Date.now() + MINUTE)).toBe(true);
      expect(await store.claim(jti, Date.now() + MINUTE)).toBe(false);
    });

    it('of 200 concurrent claims of one jti, exactly one wins', async () => {
      const store = await fresh();
      const jti = newJti();
      const keepUntil = Date.now() + MINUTE;
      const results = await Promise.all(Array.from({ length: 200 }, () => store.claim(jti, keepUntil)));
      expect(results.filter((won) => won)).toHaveLength(1);
      expect(results.filter((won) => !won)).toHaveLength(199);
    });

    it('claims of distinct jtis are independent', async () => {
      const store = await fresh();
      const [a, b, c] = [newJti(), newJti(), newJti()];
      const keepUntil = Date.now() + MINUTE;
      expect(await store.claim(a, keepUntil)).toBe(true);
      expect(await store.claim(b, keepUntil)).toBe(true);
      expect(await store.isClaimed(c)).toBe(false);
      expect(await store.claim(a, keepUntil)).toBe(false);
      expect(await store.claim(c, keepUntil)).toBe(true);
      // Concurrent claims of many distinct jtis all win.
      const many = Array.from({ length: 50 }, newJti);
      const results = await Promise.all(many.map((jti) => store.claim(jti, keepUntil)));
      expect(results.every((won) => won)).toBe(true);
    });

    it('isClaimed is false before the claim and true after it', async () => {
      const store = await fresh();
      const jti = newJti();
      expect(await store.isClaimed(jti)).toBe(false);
      // Asking does not claim.
      expect(await store.isClaimed(jti)).toBe(false);
      expect(await store.claim(jti, Date.now() + MINUTE)).toBe(true);
      expect(await store.isClaimed(jti)).toBe(true);
    });

    it('a claim is forgotten once its keepUntil has passed', async () => {
      const store = await fresh();
      const jti = newJti();
      const start = Date.now();
      if (!options.realClock) {
        vi.useFakeTimers({ toFake: ['Date'] });
        vi.setSystemTime(start);
      }
      expect(await store.claim(jti, start + 50)).toBe(true);
      expect(await store.isClaimed(jti)).toBe(true);
      if (options.realClock) await new Promise((resolve) => setTimeout(resolve, 100));
      else vi.setSystemTime(start + 100);
      expect(await store.isClaimed(jti)).toBe(false);
      // The jti is free again (a token that old is refused by verification anyway).
      expect(await store.claim(jti, Date.now() + MINUTE)).toBe(true);
      expect(await store.claim(jti, Date.now() + MINUTE)).toBe(false);
    });

    it('ping resolves when the store can answer', async () => {
      const store = await fresh();
      await expect(store.ping()).resolves.toBeUndefined();
    });

    it('close resolves', async () => {
      const store = await open();
      await store.claim(newJti(), Date.now() + MINUTE);
      await expect(store.close()).resolves.toBeUndefined();
    });
  });
}
