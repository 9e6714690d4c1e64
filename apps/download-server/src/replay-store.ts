import { type FileHandle, mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * Remembers which download tokens (by `jti`) were used. The single-use guarantee rests on it.
 * Every implementation passes `test/replay-store.contract.ts`.
 */
export interface ReplayStore {
  /**
   * Atomically marks `jti` as used until `keepUntil` (epoch ms). Resolves `true` for exactly one
   * caller among any number of concurrent callers sharing the store, `false` for every other and
   * for every later call before `keepUntil`. Rejects when it cannot tell; callers must then
   * send nothing (fail closed).
   */
  claim(jti: string, keepUntil: number): Promise<boolean>;
  /** Whether `jti` is marked as used. Rejects when it cannot tell. */
  isClaimed(jti: string): Promise<boolean>;
  /** Resolves when the store can answer; rejects otherwise. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/**
 * In-process replay store for a single B. Claims survive a restart through a journal in
 * `dir`: every claim is appended before the first byte is sent and read back at start. The
 * journal rotates every `windowMs` (the longest a token can stay acceptable), and a file two
 * windows old holds nothing that matters any more, so disk use stays bounded.
 *
 * Several B replicas cannot share it: they need the Redis store.
 */
export class MemoryReplayStore implements ReplayStore {
  readonly #claims = new Map<string, number>();
  readonly #dir: string | undefined;
  readonly #windowMs: number;
  #journal: FileHandle | undefined;
  #rotatedAt = Date.now();
  #rotating: Promise<void> | undefined;

  private constructor(dir: string | undefined, windowMs: number) {
    this.#dir = dir;
    this.#windowMs = windowMs;
  }

  /** Opens the store; with `dir`, claims are journalled there and reloaded from it. */
  static async open(options: { dir?: string; windowMs: number }): Promise<MemoryReplayStore> {
    const store = new MemoryReplayStore(options.dir, options.windowMs);
    if (options.dir) {
      await mkdir(options.dir, { recursive: true });
      for (const name of ['previous.log', 'current.log']) await store.#load(join(options.dir, name));
      await store.#rotate();
    }
    return store;
  }

  async claim(jti: string, keepUntil: number): Promise<boolean> {
    const now = Date.now();
    const until = this.#claims.get(jti);
    if (until !== undefined && until > now) return false;
    // Set before the first await: JavaScript runs this synchronously, so no concurrent caller
    // in this process can slip in between the check and the set.
    this.#claims.set(jti, keepUntil);
    if (this.#dir) {
      if (!this.#rotating && now - this.#rotatedAt > this.#windowMs) this.#rotating = this.#rotate();
      await this.#rotating;
      await this.#journal?.write(`${jti} ${keepUntil}\n`);
    }
    return true;
  }

  async isClaimed(jti: string): Promise<boolean> {
    const until = this.#claims.get(jti);
    return until !== undefined && until > Date.now();
  }

  async ping(): Promise<void> {}

  async close(): Promise<void> {
    await this.#rotating;
    await this.#journal?.close();
    this.#journal = undefined;
  }

  async #load(file: string): Promise<void> {
    const text = await readFile(file, 'utf8').catch(() => '');
    const now = Date.now();
    for (const line of text.split('\n')) {
      const [jti, until] = line.split(' ');
      const keepUntil = Number(until);
      if (jti && keepUntil > now) this.#claims.set(jti, keepUntil);
    }
  }

  // current.log → previous.log, a fresh current.log; entries older than two windows are dropped
  // from memory as well.
  async #rotate(): Promise<void> {
    const dir = this.#dir as string;
    await this.#journal?.close();
    await rm(join(dir, 'previous.log'), { force: true });
    await rename(join(dir, 'current.log'), join(dir, 'previous.log')).catch(() => {});
    this.#journal = await open(join(dir, 'current.log'), 'a', 0o600);
    this.#rotatedAt = Date.now();
    this.#rotating = undefined;
    for (const [jti, until] of this.#claims) if (until <= this.#rotatedAt) this.#claims.delete(jti);
  }
}
