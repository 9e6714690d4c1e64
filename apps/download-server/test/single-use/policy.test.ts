/**
 * The spec of single use's policy (src/single-use/policy.ts): the rule, the bounds of a token,
 * what a response cut short gives back, how long a record lasts, and `SingleUse` as the route
 * uses it (over the memory store; every store passes store.contract.ts with the same rule).
 */
import fc from 'fast-check';
import { nanoid } from 'nanoid';
import { describe, expect, it, onTestFinished } from 'vitest';
import { MemoryReplayStore } from '../../src/single-use/memory-store.ts';
import {
  decide,
  giveBack,
  keepUsedUntil,
  limitsFor,
  MAX_RESPONSES,
  REPLICA_CLOCK_MARGIN_SECONDS,
  refusedFrom,
  replayWindowMs,
  SingleUse,
} from '../../src/single-use/policy.ts';

const MIB = 1024 * 1024;
const ACCEPTANCE = { maxTokenAgeSeconds: 300, clockToleranceSeconds: 5 };

describe('the bounds of a token', () => {
  it('every byte once, plus at most the file again or 8 margins, in at most 32 responses', () => {
    expect(limitsFor(1_000, 100)).toEqual({ maxBytes: 1_800, maxResponses: 32 });
    expect(limitsFor(40 * MIB, 16 * MIB)).toEqual({ maxBytes: 80 * MIB, maxResponses: 32 });
    expect(limitsFor(0, 16 * MIB)).toEqual({ maxBytes: 0, maxResponses: MAX_RESPONSES });
  });
});

describe('decide', () => {
  const limits = limitsFor(1_000, 100);
  const usage = { ranges: [100, 200, 500, 600], bytes: 200, responses: 2 };

  it.each([
    ['a range before every recorded one', 0, 100, { ok: true }],
    ['a range between two, touching both', 200, 500, { ok: true }],
    ['a range overlapping the first by one byte', 199, 300, { ok: false, refusal: 'overlap' }],
    ['a range inside the second', 550, 560, { ok: false, refusal: 'overlap' }],
    ['a range over everything', 0, 1_000, { ok: false, refusal: 'overlap' }],
  ] as const)('%s', (_label, start, end, answer) => {
    expect(decide(usage, start, end, limits)).toEqual(answer);
  });

  it('overlap first, then responses, then bytes', () => {
    const full = { ranges: [0, 10], bytes: 1_790, responses: 32 };
    expect(decide(full, 5, 20, limits)).toEqual({ ok: false, refusal: 'overlap' });
    expect(decide(full, 10, 30, limits)).toEqual({ ok: false, refusal: 'responses' });
    expect(decide({ ...full, responses: 31 }, 10, 30, limits)).toEqual({ ok: false, refusal: 'bytes' });
    expect(decide({ ...full, responses: 31 }, 10, 20, limits)).toEqual({ ok: true });
  });

  it('nothing recorded: anything within the bounds', () => {
    expect(decide(undefined, 0, 1_000, limits)).toEqual({ ok: true });
    expect(decide(undefined, 0, 1_801, limits)).toEqual({ ok: false, refusal: 'bytes' });
  });
});

describe('giveBack: what a response cut short releases', () => {
  it('from the margin before the last written byte to the end; the unwritten bytes come off the count', () => {
    expect(giveBack(0, 1_000, 400, 100)).toEqual({ from: 300, unsent: 600 });
    expect(giveBack(500, 1_000, 50, 100)).toEqual({ from: 500, unsent: 450 });
    // Nothing written (or the count is off): all of it, uncounted.
    expect(giveBack(0, 1_000, 0, 100)).toEqual({ from: 0, unsent: 1_000 });
    expect(giveBack(0, 1_000, -5, 100)).toEqual({ from: 0, unsent: 1_000 });
    // Everything written: the margin before the end, counted.
    expect(giveBack(0, 1_000, 1_000, 100)).toEqual({ from: 900, unsent: 0 });
    // More than the range written (the head counts too): the same.
    expect(giveBack(0, 1_000, 1_500, 100)).toEqual({ from: 900, unsent: 0 });
  });

  it('never releases before the range, never more than the margin of written bytes, never a byte not counted', () => {
    fc.assert(
      fc.property(
        fc.nat(1e9),
        fc.integer({ min: 1, max: 1e9 }),
        fc.integer({ min: -10, max: 2e9 }),
        fc.integer({ min: 65_536, max: 1e9 }),
        (start, length, written, margin) => {
          const end = start + length;
          const back = giveBack(start, end, written, margin);
          if (!back) return;
          const lastWritten = end - back.unsent;
          expect(back.from).toBeGreaterThanOrEqual(start);
          expect(back.from).toBeLessThan(end);
          expect(lastWritten).toBeGreaterThanOrEqual(start);
          expect(lastWritten).toBeLessThanOrEqual(end);
          // The written bytes made sendable again: the resend margin at most.
          expect(Math.max(0, lastWritten - back.from)).toBeLessThanOrEqual(margin);
        },
      ),
    );
  });

  it('a head counted as body only makes fewer bytes sendable again (the safe side)', () => {
    const head = 1_500;
    const body = 10 * MIB;
    const exact = giveBack(0, 40 * MIB, body, 16 * MIB);
    const withHead = giveBack(0, 40 * MIB, body + head, 16 * MIB);
    expect(withHead?.unsent).toBe((exact?.unsent as number) - head);
    expect(withHead?.from).toBeGreaterThanOrEqual(exact?.from as number);
  });
});

describe('how long a record lasts', () => {
  it('until the token is refused on every replica: exp or the age limit, plus the tolerance and the replicas’ margin', () => {
    const iat = 1_000_000;
    // exp first.
    expect(refusedFrom({ iat, exp: iat + 60 }, ACCEPTANCE)).toBe((iat + 65) * 1000);
    // The age limit first: it lasts until the end of its last second.
    expect(refusedFrom({ iat, exp: iat + 3_600 }, ACCEPTANCE)).toBe((iat + 306) * 1000);
    expect(keepUsedUntil({ iat, exp: iat + 60 }, ACCEPTANCE)).toBe(
      (iat + 65 + REPLICA_CLOCK_MARGIN_SECONDS) * 1000,
    );
    // No record made now matters longer than the window.
    const now = iat;
    for (const exp of [iat + 1, iat + 60, iat + 3_600])
      expect(keepUsedUntil({ iat, exp }, ACCEPTANCE) - now * 1000).toBeLessThanOrEqual(
        replayWindowMs(ACCEPTANCE),
      );
  });
});

describe('SingleUse, as the route asks it', () => {
  async function singleUse() {
    const store = await MemoryReplayStore.open({ windowMs: 60_000 });
    onTestFinished(() => store.close());
    const iat = Math.floor(Date.now() / 1000);
    const token = { jti: nanoid(), iat, exp: iat + 60, size: 1_000 };
    return { store, token, use: new SingleUse(store, { ...ACCEPTANCE, resendMarginBytes: 100 }) };
  }

  it('reserve takes a range under the token’s bounds; check answers the same and reserves nothing', async () => {
    const { store, token, use } = await singleUse();
    expect(await use.check(token, 0, 1_000)).toEqual({ ok: true });
    expect(await store.usage(token.jti)).toBeUndefined();
    expect(await use.reserve(token, 0, 500)).toEqual({ ok: true });
    expect(await use.check(token, 400, 600)).toEqual({ ok: false, refusal: 'overlap' });
    expect(await use.reserve(token, 400, 600)).toEqual({ ok: false, refusal: 'overlap' });
    expect(await use.check(token, 500, 1_000)).toEqual({ ok: true });
    expect(await store.usage(token.jti)).toEqual({ ranges: [0, 500], bytes: 500, responses: 1 });
  });

  it('cancel gives a reservation back whole: range, bytes and response', async () => {
    const { store, token, use } = await singleUse();
    expect((await use.reserve(token, 0, 500)).ok).toBe(true);
    expect((await use.reserve(token, 500, 1_000)).ok).toBe(true);
    await use.cancel(token, 500, 1_000);
    expect(await store.usage(token.jti)).toEqual({ ranges: [0, 500], bytes: 500, responses: 1 });
    await use.cancel(token, 0, 500);
    expect(await store.usage(token.jti)).toBeUndefined();
    // So 32 cancelled tries leave all 32 responses.
    for (let i = 0; i < 40; i++) {
      expect((await use.reserve(token, 0, 1_000)).ok).toBe(true);
      await use.cancel(token, 0, 1_000);
    }
    expect(await use.reserve(token, 0, 1_000)).toEqual({ ok: true });
  });

  it('interrupted releases from the margin before the last written byte, and says how much was written twice', async () => {
    const { store, token, use } = await singleUse();
    expect((await use.reserve(token, 0, 1_000)).ok).toBe(true);
    expect(await use.interrupted(token, 0, 1_000, 400)).toBe(100);
    expect(await store.usage(token.jti)).toEqual({ ranges: [0, 300], bytes: 400, responses: 1 });
    expect((await use.reserve(token, 300, 1_000)).ok).toBe(true);
    // All written: nothing to give back but the margin.
    expect(await use.interrupted(token, 300, 1_000, 700)).toBe(100);
    expect(await store.usage(token.jti)).toEqual({ ranges: [0, 900], bytes: 1_100, responses: 2 });
  });
});
