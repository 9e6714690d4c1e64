import { Redis, type Result } from 'ioredis';
import type { Limits, Refusal, ReplayStore, Reservation, Usage } from './policy.ts';
// The scripts are text, bundled into B (esbuild's text loader; vitest.config.ts for the tests).
import RELEASE_LUA from './release.lua';
import RESERVE_LUA from './reserve.lua';

declare module 'ioredis' {
  interface RedisCommander<Context> {
    dlReserve(
      key: string,
      start: number,
      end: number,
      ttl: number,
      maxBytes: number,
      maxResponses: number,
    ): Result<string, Context>;
    dlRelease(
      key: string,
      from: number,
      end: number,
      unsent: number,
      responses: number,
    ): Result<number, Context>;
  }
}

/** Where the store reports trouble with Redis (a pino logger fits). */
export interface RedisReplayStoreLog {
  warn(obj: object, msg: string): void;
  /** Used for the refusal that makes every claim fail; `warn` when absent. */
  error?(obj: object, msg: string): void;
}

export interface RedisReplayStoreOptions {
  /** `redis://` or `rediss://` URL, credentials and database included. */
  url: string;
  /** Prepended to every jti: `<keyPrefix><jti>` is the key. */
  keyPrefix: string;
  /** How long one command may take before it rejects (the request then gets 503). */
  commandTimeoutMs: number;
  /**
   * Refuse to serve (every claim rejects) unless Redis runs with `maxmemory-policy noeviction`.
   * With `false`, another policy only logs a warning.
   */
  requireNoEviction: boolean;
  log?: RedisReplayStoreLog;
}

/** After this long, a refused eviction policy is read again (ops may have fixed it live). */
const RECHECK_REFUSED_MS = 1_000;
/**
 * After this long, an accepted policy is read again: `CONFIG SET maxmemory-policy` needs no
 * restart, so a Redis may start evicting while B runs. Claims are refused within this of it.
 */
export const POLICY_RECHECK_MS = 5_000;
/** Reconnect backoff: 100 ms more per failed attempt, never more than this. */
const MAX_RECONNECT_DELAY_MS = 2_000;

/**
 * Replay store shared by any number of B replicas through one Redis (README "One download
 * per token", "Several replicas"). A token's record is the hash `<keyPrefix><jti>` (its ranges, bytes and
 * responses), with a TTL (`PEXPIRE`) that ends at the token's `keepUntil`, so Redis forgets it
 * exactly when it stops mattering.
 *
 * What each method guarantees:
 * - `reserve` is one Lua script, reserve.lua (check and write in one step, never a read followed by a write):
 *   Redis runs scripts one at a time, so of any number of concurrent reserves of overlapping
 *   bytes of one jti, from any number of replicas, exactly one is granted. It rejects when Redis
 *   does not answer within `commandTimeoutMs`, is disconnected, or is refused for its eviction
 *   policy. A rejected reserve may still have reached Redis (the reply got lost), so the bytes may
 *   stay reserved without being sent: that is the fail-closed side, by design.
 * - `release` is one Lua script too, release.lua; it leaves the TTL alone and does nothing on an
 *   expired key.
 * - `usage` is one `HMGET`; it reserves nothing. Rejects like `reserve`.
 * - `ping` resolves only when a claim could succeed now (Redis answers and its policy is
 *   acceptable), which is what /readyz needs.
 * - `close` sends `QUIT` when connected (replies in flight still arrive), else drops the socket.
 *
 * Auto-pipelining: commands issued while a batch is on its way go out together in the next one,
 * one socket write and one read for many claims under load (as the memory store's group commit).
 * Each is still its own atomic script; only the trips are shared.
 *
 * The offline queue is off on purpose. ioredis normally queues commands while it reconnects and
 * sends them when Redis is back, which would hold a download request open for as long as Redis
 * is down and then claim tokens whose clients have long given up. Without it a command fails at
 * once while disconnected, B answers 503, and the client may retry. Commands that were in flight
 * when the connection dropped are rejected, never resent. Reconnecting continues in the
 * background with a capped backoff, so B recovers by itself when Redis returns; it also starts
 * when Redis is down (the store then rejects until Redis answers).
 *
 * Why `noeviction` matters: with any other `maxmemory-policy`, a Redis under memory pressure
 * deletes keys to make room, and a deleted claim makes a used token valid again until it
 * expires, which breaks single use silently. With `noeviction` Redis refuses writes instead,
 * the claim rejects and B fails closed. The policy is read with `CONFIG GET` at open (a wrong
 * policy with `requireNoEviction` makes `open` throw) and again after every reconnect (Redis may
 * have been restarted with other settings), every `POLICY_RECHECK_MS` while B runs (`CONFIG SET`
 * changes it live) and on every `ping` (/readyz); until it has been read on the current
 * connection, a store that requires `noeviction` rejects every call. Managed services that disable `CONFIG`
 * get a warning and are trusted.
 */
export class RedisReplayStore implements ReplayStore {
  readonly #client: Redis;
  readonly #keyPrefix: string;
  readonly #requireNoEviction: boolean;
  readonly #log: RedisReplayStoreLog | undefined;
  /** Bumped on every `ready`: a policy read on an older connection says nothing about this one. */
  #connection = 0;
  /** The connection on which the policy was last read, and what came of it. */
  #checkedOn = -1;
  #checkedAt = 0;
  #refusal: Error | undefined;
  #checking: Promise<void> | undefined;
  #down = false;
  #warnedNoConfig = false;
  #closing: Promise<void> | undefined;

  private constructor(client: Redis, options: RedisReplayStoreOptions) {
    this.#client = client;
    this.#keyPrefix = options.keyPrefix;
    this.#requireNoEviction = options.requireNoEviction;
    this.#log = options.log;
  }

  /**
   * Creates the client and tries to connect once. Resolves also when Redis is unreachable
   * (B starts; the store rejects until Redis answers). Rejects only when Redis answers with an
   * eviction policy other than `noeviction` and `requireNoEviction` is set.
   */
  static async open(options: RedisReplayStoreOptions): Promise<RedisReplayStore> {
    const client = new Redis(options.url, {
      lazyConnect: true,
      enableOfflineQueue: false,
      autoResendUnfulfilledCommands: false,
      maxRetriesPerRequest: 0,
      enableAutoPipelining: true,
      commandTimeout: options.commandTimeoutMs,
      // Bounds how long `open` (and each reconnect) waits on a host that drops packets.
      connectTimeout: Math.max(options.commandTimeoutMs, 2_000),
      retryStrategy: (attempt) => Math.min(attempt * 100, MAX_RECONNECT_DELAY_MS),
    });
    client.defineCommand('dlReserve', { numberOfKeys: 1, lua: RESERVE_LUA });
    client.defineCommand('dlRelease', { numberOfKeys: 1, lua: RELEASE_LUA });
    const store = new RedisReplayStore(client, options);
    // Without an 'error' listener ioredis prints every failed reconnect attempt.
    client.on('error', (error: Error) => store.#onDown(error));
    // A clean close (Redis stopped, or its host closed the socket) comes without an 'error'.
    client.on('close', () => store.#onDown());
    client.on('ready', () => store.#onReady());

    try {
      await client.connect();
    } catch (error) {
      store.#onDown(error as Error);
      return store;
    }
    try {
      await store.#checkPolicy();
    } catch (error) {
      // Redis went away between connecting and the check: read again before the next claim.
      store.#log?.warn({ err: error }, 'Redis replay store: could not read maxmemory-policy');
    }
    if (store.#refusal) {
      await store.close();
      throw store.#refusal;
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
    await this.#usable();
    const ttl = Math.max(1, Math.ceil(keepUntil - Date.now()));
    const answer = await this.#client.dlReserve(
      this.#key(jti),
      start,
      end,
      ttl,
      limits.maxBytes,
      limits.maxResponses,
    );
    return answer === 'ok' ? { ok: true } : { ok: false, refusal: answer as Refusal };
  }

  async release(jti: string, from: number, end: number, unsent: number, responses: number): Promise<void> {
    await this.#usable();
    await this.#client.dlRelease(this.#key(jti), from, end, unsent, responses);
  }

  async usage(jti: string): Promise<Usage | undefined> {
    await this.#usable();
    const [ranges, bytes, responses] = await this.#client.hmget(this.#key(jti), 'r', 'b', 'n');
    if (responses === null || responses === undefined) return undefined;
    return {
      ranges: ranges ? ranges.split(/[-,]/).map(Number) : [],
      bytes: Number(bytes ?? 0),
      responses: Number(responses),
    };
  }

  async ping(): Promise<void> {
    // /readyz reads the policy afresh: readiness must not trail a change by the recheck period.
    if (this.#requireNoEviction) await this.#checkPolicy();
    await this.#usable();
    await this.#client.ping();
  }

  async close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#client.status === 'ready') {
        try {
          await this.#client.quit();
          return;
        } catch {
          // Redis went away meanwhile: drop the socket below.
        }
      }
      this.#client.disconnect();
    })();
    return this.#closing;
  }

  #key(jti: string): string {
    return this.#keyPrefix + jti;
  }

  /** Resolves when a store that requires `noeviction` has seen it on the current connection. */
  async #usable(): Promise<void> {
    if (!this.#requireNoEviction) return;
    const age = Date.now() - this.#checkedAt;
    const stale =
      this.#checkedOn !== this.#connection ||
      age > (this.#refusal === undefined ? POLICY_RECHECK_MS : RECHECK_REFUSED_MS);
    if (stale) await this.#checkPolicy();
    if (this.#refusal) throw this.#refusal;
  }

  /**
   * Reads `maxmemory-policy` (one read at a time). Rejects when Redis does not answer; records
   * a refusal when the policy is wrong and `requireNoEviction` is set.
   */
  #checkPolicy(): Promise<void> {
    this.#checking ??= this.#readPolicy().finally(() => {
      this.#checking = undefined;
    });
    return this.#checking;
  }

  async #readPolicy(): Promise<void> {
    const connection = this.#connection;
    let policy: string | undefined;
    try {
      policy = policyFrom(await this.#client.config('GET', 'maxmemory-policy'));
    } catch (error) {
      if ((error as Error).name !== 'ReplyError') throw error;
      // CONFIG is disabled or not permitted (managed Redis): trust the operator, say it once.
      if (!this.#warnedNoConfig) {
        this.#warnedNoConfig = true;
        this.#log?.warn(
          { err: error },
          'Redis replay store: cannot read maxmemory-policy (CONFIG is not allowed); make sure Redis runs with noeviction, or used tokens may be forgotten',
        );
      }
    }
    this.#checkedOn = connection;
    this.#checkedAt = Date.now();
    if (policy === undefined || policy === 'noeviction') {
      this.#refusal = undefined;
      return;
    }
    if (!this.#requireNoEviction) {
      this.#log?.warn(
        { maxmemoryPolicy: policy },
        `Redis maxmemory-policy is ${policy}; with any policy but noeviction, Redis under memory pressure may forget used tokens`,
      );
      return;
    }
    const first = this.#refusal === undefined;
    this.#refusal = new Error(
      `Redis maxmemory-policy is ${policy}; B needs noeviction or used tokens may be forgotten; set REDIS_ALLOW_EVICTION=true to only warn`,
    );
    if (first) {
      const log = this.#log?.error ? this.#log.error.bind(this.#log) : this.#log?.warn.bind(this.#log);
      log?.({ maxmemoryPolicy: policy }, `${this.#refusal.message}. Every download is refused (503).`);
    }
  }

  #onReady(): void {
    this.#connection++;
    if (this.#down) {
      this.#down = false;
      this.#log?.warn({}, 'Redis replay store: connected again');
    }
    // Read the policy now, not on the next claim, so a wrong one is logged at once. A failure
    // here is retried by the next call that needs it.
    this.#checkPolicy().catch(() => {});
  }

  #onDown(error?: Error): void {
    // One line per outage, not one per reconnect attempt.
    if (this.#down || this.#closing) return;
    this.#down = true;
    this.#log?.warn(
      error ? { err: error } : {},
      'Redis replay store: Redis unreachable; downloads are refused (503) until it answers',
    );
  }
}

/** `CONFIG GET` answers `[name, value]` (RESP2, or RESP3 in ioredis' legacy mapping) or a map. */
function policyFrom(reply: unknown): string | undefined {
  if (Array.isArray(reply)) return reply[1] === undefined ? undefined : String(reply[1]);
  if (reply && typeof reply === 'object') {
    const value = (reply as Record<string, unknown>)['maxmemory-policy'];
    return value === undefined ? undefined : String(value);
  }
  return undefined;
}
