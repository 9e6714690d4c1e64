import { hash, verify } from '@node-rs/argon2';
import PQueue from 'p-queue';
import { Busy } from './errors.ts';

// `Algorithm.Argon2id`; the package exports it as a const enum, which isolated modules cannot use.
const ARGON2ID = 2;

export interface PasswordCost {
  memoryKib: number;
  timeCost: number;
}

/** How much argon2 work one process takes on: running at once, and waiting for a turn. */
export interface PasswordWork {
  concurrency: number;
  queueMax: number;
}

/**
 * argon2id hashing with the configured cost (the OWASP minimum by default, cheaper in tests),
 * for every password use of the process: sign-in, registration, password change, share
 * passwords. One per process: the bound below holds only if all of them go through it.
 */
export function passwordHasher(cost: PasswordCost, work: PasswordWork) {
  const options = {
    algorithm: ARGON2ID,
    memoryCost: cost.memoryKib,
    timeCost: cost.timeCost,
    parallelism: 1,
  };
  // Each argon2 call holds one of libuv's threads (4 by default) for its whole run, and token
  // signing, file I/O and DNS wait for the same threads: a flood of password work (concurrent
  // password-share creations from one account) would stall everyone's sign-in and downloads.
  // At most `concurrency` run at once; `queueMax` more wait; anything past that is shed at
  // once with 503 BUSY instead of queueing without bound.
  const queue = new PQueue({ concurrency: work.concurrency });
  const bounded =
    (queueMax: number, priority: number) =>
    <T>(run: () => Promise<T>): Promise<T> => {
      if (queue.pending >= work.concurrency && queue.size >= queueMax) return Promise.reject(new Busy());
      return queue.add(run, { priority });
    };
  // Verified against when the user does not exist, so an unknown username costs as much time as
  // a wrong password and response times do not reveal which accounts exist.
  const dummy = hash('not a password of anyone', options);
  const hasher = (queueMax: number, priority: number) => {
    const queued = bounded(queueMax, priority);
    return {
      /** The argon2id hash of `password`; `BUSY` when the queue is full. */
      hash: (password: string) => queued(() => hash(password, options)),
      /**
       * Verifies `password` against `stored`, or spends the same time and fails when there is
       * no user; `BUSY` when the queue is full.
       */
      async verify(stored: string | undefined, password: string): Promise<boolean> {
        const against = stored ?? (await dummy);
        const ok = await queued(() => verify(against, password));
        return stored !== undefined && ok;
      },
    };
  };
  return {
    /** For accounts: sign-in, registration, password change. */
    ...hasher(work.queueMax, 1),
    /**
     * For share links (creating password shares, checking share passwords): what any account
     * or anyone with a link can start. Account work goes ahead of it in the queue, and it is
     * shed once half the queue waits: a flood of share work delays a sign-in by the hashes
     * running at the time, and cannot get it shed.
     */
    shares: hasher(Math.floor(work.queueMax / 2), 0),
    /** argon2 calls running and waiting now. */
    load: () => ({ running: queue.pending, waiting: queue.size }),
  };
}

export type PasswordHasher = ReturnType<typeof passwordHasher>;
