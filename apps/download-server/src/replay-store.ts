import { writeSync } from 'node:fs';
import { type FileHandle, mkdir, open, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError } from '@sfh/config';
import lockfile from 'proper-lockfile';

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

/** The bounds of one token (design.md "Single use"): past either, every reserve is refused. */
export interface Limits {
  /** Most bytes a token may ever yield: `size + min(size, 8 × RESEND_MARGIN_BYTES)`. */
  maxBytes: number;
  /** Most responses that may send bytes under one token. */
  maxResponses: number;
}

/** Why a reserve was refused: the bytes overlap what was sent or is in flight, or a bound. */
export type Refusal = 'overlap' | 'bytes' | 'responses';
export type Reservation = { ok: true } | { ok: false; refusal: Refusal };

/** Each refusal, for `decide`. */
const REFUSED = {
  overlap: { ok: false, refusal: 'overlap' },
  bytes: { ok: false, refusal: 'bytes' },
  responses: { ok: false, refusal: 'responses' },
} as const;
const GRANTED = { ok: true } as const;

const NOTHING: Usage = { ranges: [], bytes: 0, responses: 0 };
/** A jti that was claimed whole (journals written before byte ranges): nothing can be reserved. */
const WHOLE: Usage = { ranges: [0, Number.MAX_SAFE_INTEGER], bytes: 0, responses: 0 };

/**
 * Remembers, per download token (`jti`), which bytes of its file were sent: the single-use
 * guarantee ("each byte at most once per token", design.md "Single use") rests on it. Ranges are
 * half-open, `[start, end)`. Every implementation passes `test/replay-store.contract.ts`.
 */
export interface ReplayStore {
  /**
   * Atomically reserves `[start, end)` under `jti` until `keepUntil` (epoch ms), counting one
   * response and `end - start` bytes against `limits`. Refuses (`overlap`) when any byte of it is
   * already reserved under `jti` (sent, or in flight in another response); ranges that only touch
   * (`[0, 10)` then `[10, 20)`) do not overlap. Refuses `responses` or `bytes` when the reserve
   * would pass a bound. Of any number of concurrent reserves of overlapping ranges, from any number
   * of callers sharing the store, exactly one succeeds. A granted reserve is recorded durably
   * before it resolves; the whole record lasts until `keepUntil`, then is forgotten. Rejects when
   * it cannot tell; callers must then send nothing (fail closed).
   */
  reserve(jti: string, start: number, end: number, keepUntil: number, limits: Limits): Promise<Reservation>;
  /**
   * Gives `[from, end)` back under `jti` (a response that ended early did not deliver it), so a
   * later reserve may take it again, and takes `unsent` bytes (never written at all) off the
   * byte count. Does nothing once the record has expired. Never grows the reservation. A release
   * lost in a crash only keeps bytes reserved: the safe side.
   */
  release(jti: string, from: number, end: number, unsent: number): Promise<void>;
  /** What `jti` has yielded so far; `undefined` when nothing (or its record expired). Rejects when it cannot tell. */
  usage(jti: string): Promise<Usage | undefined>;
  /** Resolves when the store can answer; rejects otherwise. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/**
 * What `reserve` answers for `[start, end)` given what a token has yielded: overlap first (a
 * replay of sent bytes), then the bounds. Pure; the Redis store runs the same rules in Lua.
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
function addRange(ranges: number[], start: number, end: number): number[] {
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
function removeRange(ranges: number[], from: number, end: number): number[] {
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

/** Where the memory store reports trouble with its journal (a pino logger fits). */
export interface JournalLog {
  warn(obj: object, msg: string): void;
}

/** A failed compaction is tried again on a claim at least this much later. */
const COMPACTION_RETRY_MS = 1_000;

/**
 * In-process replay store for a single B. Reservations survive a restart through a journal,
 * `dir/claims.log`: after every reserve and release, the jti's whole record is appended as one
 * line (`jti keepUntil bytes responses s0,e0,s1,e1...`; the last line of a jti wins) and synced
 * to disk (fdatasync) before the reserve resolves, so before the first byte is sent; the journal
 * is read back at start. A line of the older `jti keepUntil` form (a token claimed whole) reloads
 * as fully sent. A response in flight when B stops stays reserved (nothing says what it
 * delivered): the fail-closed side. Every `windowMs` (the longest a used token stays
 * recorded) the journal is rewritten with only the claims that still matter, so memory and
 * disk stay bounded.
 *
 * Fail-closed: a journal that exists but cannot be read stops `open` (only "no such file"
 * means no claims yet), since treating it as empty would make used tokens valid again. A
 * failed compaction is logged and retried, and claims go on into the current journal
 * meanwhile; `ping` rejects while the last write or compaction failed, so /readyz says so.
 *
 * Several B replicas cannot share it: they need the Redis store. Two B on one folder would each
 * accept a token once, and one's compaction would leave the other appending to a deleted file,
 * so the store holds an exclusive lock on its folder (`dir/claims.lock`, kept fresh while it
 * runs): a second B refuses to start. The lock of a B that died expires after LOCK_STALE_MS.
 */
const LOCK_STALE_MS = 10_000;

export class MemoryReplayStore implements ReplayStore {
  readonly #records = new Map<string, { until: number; usage: Usage }>();
  readonly #file: string | undefined;
  readonly #windowMs: number;
  readonly #log: JournalLog | undefined;
  #journal: FileHandle | undefined;
  #compactedAt = 0;
  #compactionFailedAt = 0;
  #compacting: Promise<void> | undefined;
  /** Why the journal cannot be trusted right now (the last write or compaction failed). */
  #writeError: Error | undefined;
  #compactionError: Error | undefined;
  /** Claims waiting for the next journal write, and that write. */
  #batch: { lines: string; written: Promise<void> } | undefined;
  /** The last journal write started (never rejects): the next batch waits for it. */
  #writing: Promise<void> = Promise.resolve();
  #unlock: (() => Promise<void>) | undefined;
  /** Set if the lock was lost (another process took the folder): the store then fails closed. */
  #lockLost: Error | undefined;

  private constructor(file: string | undefined, windowMs: number, log: JournalLog | undefined) {
    this.#file = file;
    this.#windowMs = windowMs;
    this.#log = log;
  }

  /** Opens the store; with `dir`, claims are journalled there and reloaded from it. */
  static async open(options: {
    dir?: string;
    windowMs: number;
    log?: JournalLog;
  }): Promise<MemoryReplayStore> {
    const store = new MemoryReplayStore(
      options.dir && join(options.dir, 'claims.log'),
      options.windowMs,
      options.log,
    );
    if (options.dir) {
      await mkdir(options.dir, { recursive: true });
      await store.#lock(options.dir);
      await store.#load();
      await store.#compact();
    }
    return store;
  }

  async reserve(
    jti: string,
    start: number,
    end: number,
    keepUntil: number,
    limits: Limits,
  ): Promise<Reservation> {
    if (this.#lockLost) throw this.#lockLost;
    const now = Date.now();
    const record = this.#live(jti, now);
    const answer = decide(record?.usage, start, end, limits);
    if (!answer.ok) return answer;
    // Set before the first await: JavaScript runs this synchronously, so no concurrent caller
    // in this process can slip in between the check and the set.
    const usage: Usage = {
      ranges: addRange(record?.usage.ranges ?? [], start, end),
      bytes: (record?.usage.bytes ?? 0) + (end - start),
      responses: (record?.usage.responses ?? 0) + 1,
    };
    this.#records.set(jti, { until: Math.max(keepUntil, record?.until ?? 0), usage });
    await this.#journalled(jti, now);
    return answer;
  }

  async release(jti: string, from: number, end: number, unsent: number): Promise<void> {
    if (this.#lockLost) throw this.#lockLost;
    const now = Date.now();
    const record = this.#live(jti, now);
    if (!record) return;
    record.usage = {
      ranges: removeRange(record.usage.ranges, from, end),
      bytes: Math.max(0, record.usage.bytes - unsent),
      responses: record.usage.responses,
    };
    await this.#journalled(jti, now);
  }

  async usage(jti: string): Promise<Usage | undefined> {
    if (this.#lockLost) throw this.#lockLost;
    return this.#live(jti, Date.now())?.usage;
  }

  #live(jti: string, now: number) {
    const record = this.#records.get(jti);
    return record && record.until > now ? record : undefined;
  }

  /** Appends the jti's record to the journal (when there is one); resolves once it is synced. */
  async #journalled(jti: string, now: number): Promise<void> {
    if (!this.#file) return;
    const due = now - this.#compactedAt > this.#windowMs;
    if (!this.#compacting && due && now - this.#compactionFailedAt > COMPACTION_RETRY_MS)
      this.#compacting = this.#retryableCompaction();
    await this.#append(line(jti, this.#records.get(jti) as { until: number; usage: Usage }));
  }

  // Group commit: one batch at a time, and the claims made while it is written and synced go out
  // together in the next (at the earliest after the current turn of the event loop, setImmediate).
  // Each claim resolves only once its own line is on disk. The append itself is synchronous: a
  // page-cache write costs a few microseconds, while an asynchronous one costs another promise and
  // trip through libuv's thread pool, which on B's hot path is busy checking signatures for jose
  // (WebCrypto); only the fdatasync, one per batch, goes there.
  #append(line: string): Promise<void> {
    if (!this.#batch) {
      const batch = { lines: '', written: Promise.resolve() };
      batch.written = this.#writing.then(async () => {
        await this.#compacting;
        await new Promise(setImmediate);
        this.#batch = undefined;
        try {
          // Synced: a claim the client got bytes for survives a power loss too.
          if (this.#journal) {
            appendAll(this.#journal.fd, Buffer.from(batch.lines));
            await this.#journal.datasync();
          }
          this.#writeError = undefined;
        } catch (error) {
          this.#writeError = error as Error;
          this.#log?.warn({ err: error }, 'replay journal: write failed; downloads are refused (503)');
          throw error;
        }
      });
      this.#writing = batch.written.catch(() => {});
      this.#batch = batch;
    }
    this.#batch.lines += line;
    return this.#batch.written;
  }

  async ping(): Promise<void> {
    if (this.#lockLost) throw this.#lockLost;
    const error = this.#writeError ?? this.#compactionError;
    if (error) throw new Error(`replay journal: ${error.message}`, { cause: error });
  }

  async close(): Promise<void> {
    await this.#compacting;
    await this.#writing;
    await this.#journal?.close();
    this.#journal = undefined;
    await this.#unlock?.().catch(() => {});
    this.#unlock = undefined;
  }

  async #lock(dir: string): Promise<void> {
    try {
      this.#unlock = await lockfile.lock(dir, {
        lockfilePath: join(dir, 'claims.lock'),
        stale: LOCK_STALE_MS,
        onCompromised: (error) => {
          this.#lockLost = new Error('lost the lock on the replay journal', { cause: error });
        },
      });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ELOCKED') throw error;
      throw new ConfigError(
        `Another download server (B) uses the replay journal in ${dir}: two B on one DATA_DIR would ` +
          'each accept a token once. Give each B its own DATA_DIR, or run several B with a shared ' +
          `REDIS_URL. (A B that crashed releases it ${LOCK_STALE_MS / 1000} s after it stopped.)`,
        { cause: error },
      );
    }
  }

  async #load(): Promise<void> {
    // Only a journal that does not exist is empty. One that cannot be read (permissions, an I/O
    // error) must stop B: read as empty and then rewritten, it would forget every used token.
    const lines = await readFile(this.#file as string, 'utf8').catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return '';
      throw new Error(`Cannot read the replay journal ${this.#file}: ${error.message}`, { cause: error });
    });
    const now = Date.now();
    for (const text of lines.split('\n')) {
      const [jti, until, bytes, responses, ranges] = text.split(' ');
      const keepUntil = Number(until);
      if (!jti || !(keepUntil > now)) continue;
      if (bytes === undefined) {
        this.#records.set(jti, { until: keepUntil, usage: WHOLE });
        continue;
      }
      const usage = {
        ranges: ranges ? ranges.split(',').map(Number) : [],
        bytes: Number(bytes),
        responses: Number(responses),
      };
      // A torn line (a crash mid-write) is the last one and was never acknowledged: skip it.
      if (
        ranges === undefined ||
        usage.ranges.some(Number.isNaN) ||
        usage.ranges.length % 2 ||
        Number.isNaN(usage.responses)
      )
        continue;
      this.#records.set(jti, { until: keepUntil, usage });
    }
  }

  // A compaction that fails leaves the current journal in place (claims go on into it), is
  // logged, and is tried again later; it never rejects, so no claim waits on a dead promise.
  async #retryableCompaction(): Promise<void> {
    try {
      await this.#compact();
      this.#compactionError = undefined;
    } catch (error) {
      this.#compactionError = error as Error;
      this.#compactionFailedAt = Date.now();
      this.#log?.warn({ err: error }, 'replay journal: compaction failed; will retry');
    } finally {
      this.#compacting = undefined;
    }
  }

  // Rewrites the journal with the live claims. Claims made meanwhile wait for it and are
  // appended to the new file; claims made before are in the snapshot. The new file is opened
  // before it replaces the old one, so the store never appends to a file that is gone.
  async #compact(): Promise<void> {
    const file = this.#file as string;
    const now = Date.now();
    let live = '';
    for (const [jti, record] of this.#records) {
      if (record.until <= now) this.#records.delete(jti);
      else live += line(jti, record);
    }
    await writeFile(`${file}.tmp`, live, { mode: 0o600, flush: true });
    const next = await open(`${file}.tmp`, 'a', 0o600);
    try {
      await rename(`${file}.tmp`, file);
    } catch (error) {
      await next.close();
      throw error;
    }
    const previous = this.#journal;
    this.#journal = next;
    await previous?.close();
    this.#compactedAt = now;
  }
}

/** One journal line: the jti's whole record. */
function line(jti: string, { until, usage }: { until: number; usage: Usage }): string {
  return `${jti} ${until} ${usage.bytes} ${usage.responses} ${usage.ranges.join(',')}\n`;
}

function appendAll(fd: number, bytes: Buffer): void {
  for (let written = 0; written < bytes.length; ) written += writeSync(fd, bytes, written);
}
