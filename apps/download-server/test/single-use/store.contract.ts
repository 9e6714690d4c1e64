/**
 * The contract every `ReplayStore` must pass (src/single-use/policy.ts; README "One download
 * per token"): a byte is reserved at most once per jti however many callers race,
 * adjacent ranges do not overlap, releases give bytes back, the byte and response bounds hold,
 * jtis are independent, and a record expires at `keepUntil`. Implementations call
 * `replayStoreContract(name, open)` from their own test file (the memory store's file adds the
 * restarts, Redis' file a second replica).
 */
import fc from 'fast-check';
import { nanoid } from 'nanoid';
import { afterEach, describe, expect, it, onTestFinished, vi } from 'vitest';
import type { Limits, ReplayStore } from '../../src/single-use/policy.ts';

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
/** The bounds of a 1000-byte file with a 100-byte margin: 1000 + min(1000, 800) bytes. */
export const LIMITS: Limits = { maxBytes: 1_800, maxResponses: 32 };

/** Reserves the whole of a 1000-byte file: what the tests that only need "used" call. */
export async function claim(store: ReplayStore, jti: string, keepUntil: number): Promise<boolean> {
  return (await store.reserve(jti, 0, 1_000, keepUntil, LIMITS)).ok;
}

/** Whether anything is recorded under `jti`. */
export async function used(store: ReplayStore, jti: string): Promise<boolean> {
  return (await store.usage(jti)) !== undefined;
}

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
    const later = () => Date.now() + MINUTE;

    it('a range is granted once; any overlap with it is refused as overlap', async () => {
      const store = await fresh();
      const jti = newJti();
      expect(await store.reserve(jti, 100, 200, later(), LIMITS)).toEqual({ ok: true });
      for (const [start, end] of [
        [100, 200],
        [0, 101],
        [199, 300],
        [150, 160],
        [0, 1_000],
      ] as const) {
        expect(await store.reserve(jti, start, end, later(), LIMITS), `${start}-${end}`).toEqual({
          ok: false,
          refusal: 'overlap',
        });
      }
      expect(await store.usage(jti)).toEqual({ ranges: [100, 200], bytes: 100, responses: 1 });
    });

    it('adjacent ranges do not overlap, and merge', async () => {
      const store = await fresh();
      const jti = newJti();
      expect((await store.reserve(jti, 100, 200, later(), LIMITS)).ok).toBe(true);
      expect((await store.reserve(jti, 0, 100, later(), LIMITS)).ok).toBe(true);
      expect((await store.reserve(jti, 200, 1_000, later(), LIMITS)).ok).toBe(true);
      expect(await store.usage(jti)).toEqual({ ranges: [0, 1_000], bytes: 1_000, responses: 3 });
      expect((await store.reserve(jti, 999, 1_000, later(), LIMITS)).ok).toBe(false);
    });

    it('of 200 concurrent reserves of one range, exactly one wins; of overlapping ranges too', async () => {
      const store = await fresh();
      const jti = newJti();
      const keepUntil = later();
      const same = await Promise.all(
        Array.from({ length: 200 }, () => store.reserve(jti, 0, 1_000, keepUntil, LIMITS)),
      );
      expect(same.filter((r) => r.ok)).toHaveLength(1);
      expect(same.filter((r) => !r.ok && r.refusal === 'overlap')).toHaveLength(199);

      const other = newJti();
      // Ranges [i*10, i*10+20): each overlaps its neighbours, so no two neighbours both win.
      const results = await Promise.all(
        Array.from({ length: 50 }, (_, i) => store.reserve(other, i * 10, i * 10 + 20, keepUntil, LIMITS)),
      );
      const won = results.flatMap((r, i) => (r.ok ? [i] : []));
      for (let k = 1; k < won.length; k++)
        expect((won[k] as number) - (won[k - 1] as number)).toBeGreaterThan(1);
      expect((await store.usage(other))?.responses).toBe(won.length);
    });

    it('a release gives the bytes back: a later reserve gets exactly them', async () => {
      const store = await fresh();
      const jti = newJti();
      expect((await store.reserve(jti, 0, 1_000, later(), LIMITS)).ok).toBe(true);
      // The response wrote 400 bytes; 100 before that and the 600 unwritten are released.
      await store.release(jti, 300, 1_000, 600, 0);
      expect(await store.usage(jti)).toEqual({ ranges: [0, 300], bytes: 400, responses: 1 });
      expect((await store.reserve(jti, 299, 1_000, later(), LIMITS)).ok).toBe(false);
      expect((await store.reserve(jti, 300, 1_000, later(), LIMITS)).ok).toBe(true);
      expect(await store.usage(jti)).toEqual({ ranges: [0, 1_000], bytes: 1_100, responses: 2 });
      // A release in the middle splits a range.
      await store.release(jti, 400, 500, 100, 0);
      expect((await store.usage(jti))?.ranges).toEqual([0, 400, 500, 1_000]);
      // Releasing what was never reserved, or under an unknown jti, changes nothing.
      const unknown = newJti();
      await store.release(unknown, 0, 10, 10, 0);
      expect(await store.usage(unknown)).toBeUndefined();
    });

    it('the byte bound: bytes re-sent after releases count until maxBytes, then bytes is refused', async () => {
      const store = await fresh();
      const jti = newJti();
      // Each round writes 400 bytes and releases them all as written-but-maybe-lost.
      for (let round = 0; round < 4; round++) {
        expect((await store.reserve(jti, 0, 400, later(), LIMITS)).ok, `round ${round}`).toBe(true);
        await store.release(jti, 0, 400, 0, 0);
      }
      expect((await store.usage(jti))?.bytes).toBe(1_600);
      expect(await store.reserve(jti, 0, 400, later(), LIMITS)).toEqual({ ok: false, refusal: 'bytes' });
      expect((await store.reserve(jti, 0, 200, later(), LIMITS)).ok).toBe(true);
      // A range bigger than the bound is refused at once.
      expect(await store.reserve(newJti(), 0, 1_801, later(), LIMITS)).toEqual({
        ok: false,
        refusal: 'bytes',
      });
    });

    it('the response bound: the 33rd response is refused, however small', async () => {
      const store = await fresh();
      const jti = newJti();
      for (let i = 0; i < 32; i++)
        expect((await store.reserve(jti, i, i + 1, later(), LIMITS)).ok).toBe(true);
      expect(await store.reserve(jti, 500, 501, later(), LIMITS)).toEqual({
        ok: false,
        refusal: 'responses',
      });
      expect((await store.usage(jti))?.responses).toBe(32);
    });

    it('any sequence of reserves, releases and cancels matches a byte-by-byte model', async () => {
      const store = await fresh();
      const SIZE = 64;
      const unbounded: Limits = { maxBytes: Number.MAX_SAFE_INTEGER, maxResponses: Number.MAX_SAFE_INTEGER };
      // Non-empty ranges, as B reserves for any file that is not empty.
      const range = fc
        .tuple(fc.nat(SIZE - 1), fc.nat(SIZE - 1))
        .map(([a, b]) => [Math.min(a, b), Math.max(a, b) + 1] as const);
      const op = fc.record({ kind: fc.constantFrom('reserve', 'reserve', 'release', 'cancel'), range });
      await fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 30 }), async (ops) => {
          const jti = newJti();
          const model = new Array<boolean>(SIZE).fill(false);
          let bytes = 0;
          let responses = 0;
          const granted: (readonly [number, number])[] = [];
          for (const { kind, range: picked } of ops) {
            if (kind === 'release') {
              await store.release(jti, picked[0], picked[1], 0, 0);
              model.fill(false, picked[0], picked[1]);
              continue;
            }
            if (kind === 'cancel') {
              // The latest granted reservation sent nothing: given back whole.
              const last = granted.pop();
              if (!last) continue;
              const [start, end] = last;
              await store.release(jti, start, end, end - start, 1);
              model.fill(false, start, end);
              bytes = Math.max(0, bytes - (end - start));
              responses = Math.max(0, responses - 1);
              continue;
            }
            const [start, end] = picked;
            const free = model.slice(start, end).every((taken) => !taken);
            expect((await store.reserve(jti, start, end, later(), unbounded)).ok).toBe(free);
            if (!free) continue;
            model.fill(true, start, end);
            bytes += end - start;
            responses += 1;
            granted.push(picked);
          }
          // The recorded ranges are exactly the model's runs of reserved bytes, with its counts;
          // a record with nothing left in it is no record.
          const runs: number[] = [];
          model.forEach((taken, i) => {
            if (taken && !model[i - 1]) runs.push(i);
            if (taken && !model[i + 1]) runs.push(i + 1);
          });
          const empty = runs.length === 0 && bytes === 0 && responses === 0;
          expect(await store.usage(jti)).toEqual(empty ? undefined : { ranges: runs, bytes, responses });
        }),
        { numRuns: 40 },
      );
    });

    it('a release with its response gives a reservation back whole; a record left empty is forgotten', async () => {
      const store = await fresh();
      const jti = newJti();
      expect((await store.reserve(jti, 0, 400, later(), LIMITS)).ok).toBe(true);
      expect((await store.reserve(jti, 400, 1_000, later(), LIMITS)).ok).toBe(true);
      await store.release(jti, 400, 1_000, 600, 1);
      expect(await store.usage(jti)).toEqual({ ranges: [0, 400], bytes: 400, responses: 1 });
      await store.release(jti, 0, 400, 400, 1);
      expect(await store.usage(jti)).toBeUndefined();
      // Nothing counts any more: all 32 responses and every byte are there again.
      for (let i = 0; i < 40; i++) {
        expect((await store.reserve(jti, 0, 1_000, later(), LIMITS)).ok, `try ${i}`).toBe(true);
        await store.release(jti, 0, 1_000, 1_000, 1);
      }
      expect(await store.usage(jti)).toBeUndefined();
    });

    it('reserves of distinct jtis are independent', async () => {
      const store = await fresh();
      const [a, b, c] = [newJti(), newJti(), newJti()];
      expect(await claim(store, a, later())).toBe(true);
      expect(await claim(store, b, later())).toBe(true);
      expect(await used(store, c)).toBe(false);
      expect(await claim(store, a, later())).toBe(false);
      expect(await claim(store, c, later())).toBe(true);
      const many = Array.from({ length: 50 }, newJti);
      const results = await Promise.all(many.map((jti) => claim(store, jti, later())));
      expect(results.every((won) => won)).toBe(true);
    });

    it('usage reserves nothing', async () => {
      const store = await fresh();
      const jti = newJti();
      expect(await store.usage(jti)).toBeUndefined();
      expect(await store.usage(jti)).toBeUndefined();
      expect(await claim(store, jti, later())).toBe(true);
      expect(await used(store, jti)).toBe(true);
    });

    it('a record is forgotten once its keepUntil has passed', async () => {
      const store = await fresh();
      const jti = newJti();
      const start = Date.now();
      if (!options.realClock) {
        vi.useFakeTimers({ toFake: ['Date'] });
        vi.setSystemTime(start);
      }
      expect(await claim(store, jti, start + 50)).toBe(true);
      expect(await used(store, jti)).toBe(true);
      if (options.realClock) await new Promise((resolve) => setTimeout(resolve, 100));
      else vi.setSystemTime(start + 100);
      expect(await used(store, jti)).toBe(false);
      // A release after expiry does not bring the record back.
      await store.release(jti, 0, 10, 10, 0);
      expect(await used(store, jti)).toBe(false);
      // The jti is free again (a token that old is refused by verification anyway).
      expect(await claim(store, jti, Date.now() + MINUTE)).toBe(true);
      expect(await claim(store, jti, Date.now() + MINUTE)).toBe(false);
    });

    it('ping resolves when the store can answer', async () => {
      const store = await fresh();
      await expect(store.ping()).resolves.toBeUndefined();
    });

    it('close resolves', async () => {
      const store = await open();
      await claim(store, newJti(), later());
      await expect(store.close()).resolves.toBeUndefined();
    });
  });
}
