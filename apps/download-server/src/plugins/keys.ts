import { createPublicKey, type JsonWebKey, type KeyObject } from 'node:crypto';
import { watch } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { type KeyResolver, TOKEN_ALGORITHM } from '@sfh/download-token';
import fp from 'fastify-plugin';
import { KeysUnavailable } from '../errors.ts';

export interface KeyStatus {
  /** Keys in the current set. */
  keys: number;
  /** When the set was last read successfully, if ever. */
  fetchedAt: Date | undefined;
  /** The set is usable: it was read, and not longer ago than the stale limit. */
  usable: boolean;
  /** The last read failed: B serves on its last good set (until the stale limit). */
  stale: boolean;
  lastError: string | undefined;
}

declare module 'fastify' {
  interface FastifyInstance {
    keys: {
      /** For `verifyDownloadToken`: the key for a kid; throws KEYS_UNAVAILABLE when the set is unusable. */
      resolve: KeyResolver;
      status(): KeyStatus;
      /** Re-reads the key set now (SIGHUP). Concurrent calls share one read. */
      refresh(): Promise<void>;
      /** Settles when B first has a usable key set. */
      ready: Promise<void>;
    };
  }
}

export interface KeysOptions {
  source: { url: string } | { file: string };
  refreshSeconds: number;
  maxStaleSeconds: number;
}

const FETCH_TIMEOUT_MS = 5_000;
const MAX_JWKS_BYTES = 1024 * 1024;
// After a failed read, retry sooner than the refresh interval so a B that started before A is
// ready within seconds of A.
const RETRY_SECONDS = 2;
// A token with a kid B does not know triggers a re-read at most this often, so a flood of
// random kids costs at most one fetch per cooldown.
const UNKNOWN_KID_COOLDOWN_MS = 10_000;
// A request that finds no usable set (B started before A was ready, or A is back after the stale
// limit) reads it right then instead of waiting for the retry timer, at most this often, so a
// burst of requests while A is down costs one fetch per interval.
const ON_DEMAND_READ_INTERVAL_MS = 1_000;

/**
 * A's public keys, read from `JWKS_URL` (or `JWKS_FILE`) at start and every
 * `JWKS_REFRESH_SECONDS`, imported once per read so verification never imports a key.
 * When the source is unreachable the last good set serves for at most `JWKS_MAX_STALE_SECONDS`;
 * past that B fails closed.
 */
export default fp(
  async (app, options: KeysOptions) => {
    let keys = new Map<string, KeyObject>();
    let fetchedAt: Date | undefined;
    let lastError: string | undefined;
    let timer: NodeJS.Timeout | undefined;
    let closed = false;
    let reading: Promise<void> | undefined;
    let unknownKidReadAt = 0;
    let onDemandReadAt = 0;
    let becameReady: () => void = () => {};
    const ready = new Promise<void>((resolve) => {
      becameReady = resolve;
    });

    const usable = () =>
      fetchedAt !== undefined && Date.now() - fetchedAt.getTime() <= options.maxStaleSeconds * 1000;

    function refresh(): Promise<void> {
      reading ??= read().finally(() => {
        reading = undefined;
      });
      return reading;
    }

    async function read(): Promise<void> {
      try {
        const next = importKeySet(await readKeySet(options.source));
        logChange(keys, next, fetchedAt === undefined);
        keys = next;
        fetchedAt = new Date();
        becameReady();
        if (lastError) app.log.info({ keys: keys.size }, 'key set read again');
        lastError = undefined;
      } catch (error) {
        const message =
          error instanceof Error ? `${error.message}${error.cause ? `: ${error.cause}` : ''}` : String(error);
        // One warning when reading starts to fail, not one per retry.
        if (lastError === undefined)
          app.log.warn({ source: options.source, error: message }, 'cannot read the key set; retrying');
        lastError = message;
      }
    }

    // Operators see B's first keys and every kid that comes or goes, e.g. to follow a rotation.
    function logChange(before: Map<string, KeyObject>, after: Map<string, KeyObject>, first: boolean) {
      const added = [...after.keys()].filter((kid) => !before.has(kid));
      const removed = [...before.keys()].filter((kid) => !after.has(kid));
      if (first) app.log.info({ kids: added }, 'key set read: B can verify tokens');
      else if (added.length > 0 || removed.length > 0) app.log.info({ added, removed }, 'key set changed');
    }

    async function readOnDemand(): Promise<void> {
      if (reading) return reading;
      if (Date.now() - onDemandReadAt < ON_DEMAND_READ_INTERVAL_MS) return;
      onDemandReadAt = Date.now();
      return refresh();
    }

    function schedule() {
      if (closed) return;
      const seconds = lastError ? Math.min(RETRY_SECONDS, options.refreshSeconds) : options.refreshSeconds;
      timer = setTimeout(() => refresh().finally(schedule), seconds * 1000);
      timer.unref();
    }

    app.decorate('keys', {
      async resolve(kid: string) {
        if (!usable()) await readOnDemand();
        if (!usable()) throw new KeysUnavailable();
        const key = keys.get(kid);
        if (key) return key;
        // Normally a key is published long before it signs. A fresh key that signs at once (A's
        // first start, or after every key was revoked) is learnt here.
        if (reading) await reading;
        else if (Date.now() - unknownKidReadAt >= UNKNOWN_KID_COOLDOWN_MS) {
          unknownKidReadAt = Date.now();
          await refresh();
        }
        return keys.get(kid);
      },
      status: () => ({
        keys: keys.size,
        fetchedAt,
        usable: usable(),
        stale: lastError !== undefined,
        lastError,
      }),
      refresh,
      ready,
    });

    // B starts even when A is down: it answers 503 KEYS_UNAVAILABLE until the first read works.
    await refresh();
    schedule();
    // A key file is re-read as soon as it changes (the CLI's export replaces it with a rename, so
    // the folder is watched, not the file).
    const watcher = 'file' in options.source ? watchKeyFile(options.source.file, refresh) : undefined;
    app.addHook('onClose', async () => {
      closed = true;
      clearTimeout(timer);
      watcher?.close();
    });
  },
  { name: 'keys' },
);

function watchKeyFile(file: string, onChange: () => void) {
  try {
    return watch(dirname(file), { persistent: false }, (_event, name) => {
      if (name === basename(file)) onChange();
    });
  } catch {
    // No folder to watch (yet): the periodic re-read still picks the file up.
    return undefined;
  }
}

async function readKeySet(source: KeysOptions['source']): Promise<unknown> {
  if ('file' in source) return JSON.parse(await readFile(source.file, 'utf8'));
  const response = await fetch(source.url, {
    signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
    headers: { accept: 'application/json' },
    redirect: 'error',
  });
  if (!response.ok) throw new Error(`GET ${source.url} answered ${response.status}`);
  const text = await response.text();
  if (text.length > MAX_JWKS_BYTES) throw new Error('key set is too large');
  return JSON.parse(text);
}

/**
 * Imports the verification keys of a JWKS. Only the public members of Ed25519 keys for our one
 * algorithm are taken: a private member, another algorithm or a key type B does not use is
 * ignored, never trusted.
 */
function importKeySet(set: unknown): Map<string, KeyObject> {
  const list = (set as { keys?: unknown })?.keys;
  if (!Array.isArray(list)) throw new Error('key set has no "keys" array');
  const keys = new Map<string, KeyObject>();
  for (const jwk of list as (JsonWebKey & { kid?: unknown })[]) {
    if (
      typeof jwk?.kid !== 'string' ||
      jwk.kty !== 'OKP' ||
      jwk.crv !== 'Ed25519' ||
      typeof jwk.x !== 'string'
    )
      continue;
    if ((jwk.alg ?? TOKEN_ALGORITHM) !== TOKEN_ALGORITHM || (jwk.use ?? 'sig') !== 'sig') continue;
    keys.set(jwk.kid, createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: jwk.x }, format: 'jwk' }));
  }
  return keys;
}
