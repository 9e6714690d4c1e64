import { writeSync } from 'node:fs';
import { type FileHandle, mkdir, open, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError } from '@sfh/config';
import lockfile from 'proper-lockfile';
import {
  addRange,
  decide,
  type Limits,
  type ReplayStore,
  type Reservation,
  removeRange,
  type Usage,
} from './policy.ts';

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
 * is read back at start. A response in flight when B stops stays reserved (nothing says what it
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

  async release(jti: string, from: number, end: number, unsent: number, responses: number): Promise<void> {
    if (this.#lockLost) throw this.#lockLost;
    const now = Date.now();
    const record = this.#live(jti, now);
    if (!record) return;
    record.usage = {
      ranges: removeRange(record.usage.ranges, from, end),
      bytes: Math.max(0, record.usage.bytes - unsent),
      responses: Math.max(0, record.usage.responses - responses),
    };
    // Its line is taken before the first await; a record with nothing left in it is no record.
    const journalled = this.#journalled(jti, now);
    if (isEmpty(record.usage)) this.#records.delete(jti);
    await journalled;
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
      const usage = {
        ranges: ranges ? ranges.split(',').map(Number) : [],
        bytes: Number(bytes),
        responses: Number(responses),
      };
      // A torn line (a crash mid-write) is the last one and was never acknowledged: skip it.
      if (
        ranges === undefined ||
        usage.ranges.some(Number.isNaN) ||
        Number.isNaN(usage.bytes) ||
        usage.ranges.length % 2 ||
        Number.isNaN(usage.responses)
      )
        continue;
      // The last line of a jti wins, also when it says that nothing is left.
      if (isEmpty(usage)) this.#records.delete(jti);
      else this.#records.set(jti, { until: keepUntil, usage });
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

const isEmpty = (usage: Usage) => usage.responses === 0 && usage.bytes === 0 && usage.ranges.length === 0;

/** One journal line: the jti's whole record. */
function line(jti: string, { until, usage }: { until: number; usage: Usage }): string {
  return `${jti} ${until} ${usage.bytes} ${usage.responses} ${usage.ranges.join(',')}\n`;
}

function appendAll(fd: number, bytes: Buffer): void {
  for (let written = 0; written < bytes.length; ) written += writeSync(fd, bytes, written);
}
