/**
 * One download per token (README "One download per token"), the whole policy:
 * how long a token's record lasts, the bounds of one token, the rule that grants or refuses a
 * range, what a response cut short gives back, and the store interface the rule runs on. The
 * stores (memory-store.ts, redis-store.ts with its .lua scripts) only keep records and apply the
 * rule atomically; the download route only asks `SingleUse`. Spec: test/single-use/policy.test.ts;
 * every store passes test/single-use/store.contract.ts.
 */

// ---------------------------------------------------------------------------------------------
// How long B accepts a token, and so how long its record must last. Both come from here, so
// single use holds until the last instant a token can be accepted, on every replica.

/** B replicas' clocks may differ by this much (NTP keeps them far closer): records last longer. */
export const REPLICA_CLOCK_MARGIN_SECONDS = 30;

export interface AcceptanceOptions {
  maxTokenAgeSeconds: number;
  clockToleranceSeconds: number;
}

/**
 * The first instant (epoch ms) at which the verifier refuses a token with these claims. The
 * verifier (jose's rules) compares whole seconds, `now = floor(Date.now() / 1000)`: it accepts
 * while `exp > now - tolerance` and while `now - iat - tolerance <= maxTokenAge`, so the age
 * limit lasts until the end of its last second.
 */
export function refusedFrom(claims: { exp: number; iat: number }, options: AcceptanceOptions): number {
  const tolerance = options.clockToleranceSeconds;
  return Math.min(claims.exp + tolerance, claims.iat + options.maxTokenAgeSeconds + tolerance + 1) * 1000;
}

/** Until when (epoch ms) a used token must stay recorded: past its acceptance on every replica. */
export function keepUsedUntil(claims: { exp: number; iat: number }, options: AcceptanceOptions): number {
  return refusedFrom(claims, options) + REPLICA_CLOCK_MARGIN_SECONDS * 1000;
}

/** The longest a record made now can matter (ms): the compaction period of the journal. */
export function replayWindowMs(options: AcceptanceOptions): number {
  return (
    (options.maxTokenAgeSeconds + options.clockToleranceSeconds + 1 + REPLICA_CLOCK_MARGIN_SECONDS) * 1000
  );
}

// ---------------------------------------------------------------------------------------------
// The record and the rule

/**
 * What a token has yielded so far: the byte ranges sent or being sent under it (sorted, disjoint,
 * half-open `[start, end)` pairs flattened: `[s0, e0, s1, e1, ...]`), the bytes written in all its
 * responses (never decreases when a range is released again, except for bytes never written), and
 * its number of responses.
 */
export interface Usage {
  ranges: number[];
  bytes: number;
  responses: number;
}

/** The bounds of one token: past either, every reserve is refused. */
export interface Limits {
  /** Most bytes a token may ever yield: `size + min(size, 8 × RESEND_MARGIN_BYTES)`. */
  maxBytes: number;
  /** Most responses that may send bytes under one token. */
  maxResponses: number;
}

/** Most responses one token may send bytes in. */
export const MAX_RESPONSES = 32;

/**
 * The bounds of a token for a file of `size` bytes: every byte once, plus what releases may make
 * sendable again (at most `RESEND_MARGIN_BYTES` per release, and never more than the file again
 * over eight releases), in at most `MAX_RESPONSES` responses.
 */
export function limitsFor(size: number, resendMarginBytes: number): Limits {
  return { maxBytes: size + Math.min(size, 8 * resendMarginBytes), maxResponses: MAX_RESPONSES };
}

/** Why a reserve was refused: the bytes overlap what was sent or is in flight, or a bound. */
export type Refusal = 'overlap' | 'bytes' | 'responses';
export type Reservation = { ok: true } | { ok: false; refusal: Refusal };

const REFUSED = {
  overlap: { ok: false, refusal: 'overlap' },
  bytes: { ok: false, refusal: 'bytes' },
  responses: { ok: false, refusal: 'responses' },
} as const;
const GRANTED = { ok: true } as const;
const NOTHING: Usage = { ranges: [], bytes: 0, responses: 0 };

/**
 * What `reserve` answers for `[start, end)` given what a token has yielded: overlap first (a
 * replay of sent bytes), then the bounds. Ranges that only touch (`[0, 10)` then `[10, 20)`) do
 * not overlap. The memory store runs this; reserve.lua is the same rule inside Redis.
 */
export function decide(usage: Usage | undefined, start: number, end: number, limits: Limits): Reservation {
  const { ranges, responses, bytes } = usage ?? NOTHING;
  for (let i = 0; i < ranges.length; i += 2) {
    if ((ranges[i] as number) < end && start < (ranges[i + 1] as number)) return REFUSED.overlap;
  }
  if (responses >= limits.maxResponses) return REFUSED.responses;
  if (bytes + (end - start) > limits.maxBytes) return REFUSED.bytes;
  return GRANTED;
}

/** `ranges` with `[start, end)` added (it overlaps none of them), touching ranges merged. */
export function addRange(ranges: number[], start: number, end: number): number[] {
  if (start >= end) return ranges;
  const out: number[] = [];
  let s = start;
  let e = end;
  let placed = false;
  for (let i = 0; i < ranges.length; i += 2) {
    const rs = ranges[i] as number;
    const re = ranges[i + 1] as number;
    if (re < s) out.push(rs, re);
    else if (rs > e) {
      if (!placed) out.push(s, e);
      placed = true;
      out.push(rs, re);
    } else {
      s = Math.min(s, rs);
      e = Math.max(e, re);
    }
  }
  if (!placed) out.push(s, e);
  return out;
}

/** `ranges` without `[from, end)`. */
export function removeRange(ranges: number[], from: number, end: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < ranges.length; i += 2) {
    const rs = ranges[i] as number;
    const re = ranges[i + 1] as number;
    if (re <= from || rs >= end) out.push(rs, re);
    else {
      if (rs < from) out.push(rs, from);
      if (re > end) out.push(end, re);
    }
  }
  return out;
}

/**
 * What a response of `[start, end)` that ended before all of it was written gives back: from
 * `resendMarginBytes` before its last written byte to the end, since B cannot know what the
 * client received (the kernel's send buffer and the client's unread buffer hold bytes B counted
 * as written), and `unsent`, the bytes never written at all, come off the byte count.
 *
 * `written` may overstate the body by up to the response's head (B counts what the socket wrote
 * during the response, head included, rather than read Node's private copy of the head): the
 * release then starts up to that much later and counts up to that much more as sent, so at most
 * `resendMarginBytes` minus the head can be sent twice. The safe side, and the head (under
 * 16 KiB) is a rounding error against the margin (at least 64 KiB).
 */
export function giveBack(
  start: number,
  end: number,
  written: number,
  resendMarginBytes: number,
): { from: number; unsent: number } | undefined {
  const lastWritten = start + Math.min(end - start, Math.max(0, written));
  const from = Math.max(start, lastWritten - resendMarginBytes);
  return from < end ? { from, unsent: end - lastWritten } : undefined;
}

// ---------------------------------------------------------------------------------------------
// The store

/**
 * Remembers, per download token (`jti`), which bytes of its file were sent: the single-use
 * guarantee ("each byte at most once per token") rests on it. Ranges are half-open,
 * `[start, end)`. Every implementation passes `test/single-use/store.contract.ts`.
 */
export interface ReplayStore {
  /**
   * Atomically reserves `[start, end)` under `jti` until `keepUntil` (epoch ms), counting one
   * response and `end - start` bytes against `limits`, by the rule of `decide`. Of any number of
   * concurrent reserves of overlapping ranges, from any number of callers sharing the store,
   * exactly one succeeds. A granted reserve is recorded durably before it resolves; the whole
   * record lasts until `keepUntil`, then is forgotten. Rejects when it cannot tell; callers must
   * then send nothing (fail closed).
   */
  reserve(jti: string, start: number, end: number, keepUntil: number, limits: Limits): Promise<Reservation>;
  /**
   * Gives `[from, end)` back under `jti`, so a later reserve may take it again, takes `unsent`
   * bytes (never written at all) off the byte count and `responses` (0 or 1: a response that sent
   * nothing) off the response count. Does nothing once the record has expired. Never grows the
   * reservation. A release lost in a crash only keeps bytes reserved: the safe side.
   */
  release(jti: string, from: number, end: number, unsent: number, responses: number): Promise<void>;
  /** What `jti` has yielded so far; `undefined` when nothing (or its record expired). Rejects when it cannot tell. */
  usage(jti: string): Promise<Usage | undefined>;
  /** Resolves when the store can answer; rejects otherwise. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// The policy over a store: what the download route asks

/** The claims single use needs: the token's id, its life, and its file's size. */
export interface TokenUse {
  jti: string;
  iat: number;
  exp: number;
  size: number;
}

export interface SingleUseOptions extends AcceptanceOptions {
  /** RESEND_MARGIN_BYTES. */
  resendMarginBytes: number;
}

/**
 * One download per token over a `ReplayStore`. Every method rejects when the store cannot
 * answer; the caller then sends nothing (fail closed).
 */
export class SingleUse {
  readonly store: ReplayStore;
  readonly #options: SingleUseOptions;

  constructor(store: ReplayStore, options: SingleUseOptions) {
    this.store = store;
    this.#options = options;
  }

  /** A GET: reserves `[start, end)` of the token's file before its first byte is sent. */
  reserve(token: TokenUse, start: number, end: number): Promise<Reservation> {
    return this.store.reserve(
      token.jti,
      start,
      end,
      keepUsedUntil(token, this.#options),
      limitsFor(token.size, this.#options.resendMarginBytes),
    );
  }

  /** A HEAD: what `reserve` would answer now, reserving nothing. */
  async check(token: TokenUse, start: number, end: number): Promise<Reservation> {
    return decide(
      await this.store.usage(token.jti),
      start,
      end,
      limitsFor(token.size, this.#options.resendMarginBytes),
    );
  }

  /**
   * A granted reserve whose response sent nothing (the object is missing, or storage failed): the
   * range, its bytes and its response are given back whole, so the token is as before.
   */
  cancel(token: TokenUse, start: number, end: number): Promise<void> {
    return this.store.release(token.jti, start, end, end - start, 1);
  }

  /**
   * A response of `[start, end)` ended after `written` bytes (what its socket wrote, head
   * included) without all of them having been written: gives back what the client may not have
   * (`giveBack`). Resolves with the written bytes made sendable again (0: nothing released).
   */
  async interrupted(token: TokenUse, start: number, end: number, written: number): Promise<number> {
    const back = giveBack(start, end, written, this.#options.resendMarginBytes);
    if (!back) return 0;
    await this.store.release(token.jti, back.from, end, back.unsent, 0);
    return end - back.unsent - back.from;
  }
}
