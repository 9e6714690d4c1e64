import { watch } from 'node:fs';
import { open } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import {
  isTokenAlgorithm,
  type KeyResolver,
  TOKEN_ALGORITHMS,
  type TokenAlgorithm,
} from '@sfh/download-token';
import fp from 'fastify-plugin';
import { type CryptoKey, createLocalJWKSet, type JWK } from 'jose';
import { KeysUnavailable } from '../errors.ts';

export interface KeyStatus {
  /** Keys in the current set. */
  keys: number;
  /** Entries of the last read set that claimed to be signing keys for us but could not be used. */
  skipped: number;
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
      /**
       * For `verifyDownloadToken`: the current set's key for a kid, if it is for that algorithm
       * (synchronous when the set is usable and knows the kid); throws KEYS_UNAVAILABLE when the
       * set is unusable.
       */
      resolve: KeyResolver;
      /**
       * For `verifyDownloadToken`: the allowlist, exactly the algorithms of the keys in the set
       * (all of `TOKEN_ALGORITHMS` while there is none, so the resolver can say why).
       */
      algorithms(): readonly TokenAlgorithm[];
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
 * `JWKS_REFRESH_SECONDS`. Each good set is handed to jose's `createLocalJWKSet`, which imports
 * every key once when the set is read, so verification never imports a key; a token's key is
 * then looked up by its `kid`, and its `alg` compared with the key's. What jose does not do stays
 * here: the refresh, the stale limit and the file watching. When the source is unreachable the
 * last good set serves for at most `JWKS_MAX_STALE_SECONDS`; past that B fails closed.
 */
export default fp(
  async (app, options: KeysOptions) => {
    let keys: KeySet = new Map();
    let algorithms: readonly TokenAlgorithm[] = TOKEN_ALGORITHMS;
    let skipped = 0;
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
        const set = await importKeySet(await readKeySet(options.source));
        for (const entry of set.skipped) app.log.warn(entry, 'skipped an unusable key in the key set');
        logChange(keys, set.keys, fetchedAt === undefined);
        keys = set.keys;
        skipped = set.skipped.length;
        algorithms = keys.size ? [...new Set([...keys.values()].map(({ alg }) => alg))] : TOKEN_ALGORITHMS;
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
    function logChange(before: Map<string, unknown>, after: Map<string, unknown>, first: boolean) {
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

    // The slow path of `resolve`: the set is stale or the kid unknown, so it may read the set.
    async function resolveAfterRead(kid: string, alg: string) {
      if (!usable()) await readOnDemand();
      if (!usable()) throw new KeysUnavailable();
      if (!keys.has(kid)) {
        // Normally a key is published long before it signs. A fresh key that signs at once (A's
        // first start, or after every key was revoked) is learnt here.
        if (reading) await reading;
        else if (Date.now() - unknownKidReadAt >= UNKNOWN_KID_COOLDOWN_MS) {
          unknownKidReadAt = Date.now();
          await refresh();
        }
      }
      return select(keys, kid, alg);
    }

    app.decorate('keys', {
      // Synchronous when the set is usable and knows the kid (every genuine token): a promise
      // and a turn of the event loop fewer per download than going through the slow path.
      resolve: (kid: string, alg: string) =>
        usable() && keys.has(kid) ? select(keys, kid, alg) : resolveAfterRead(kid, alg),
      algorithms: () => algorithms,
      status: () => ({
        keys: keys.size,
        skipped,
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
  if ('file' in source) return JSON.parse(await readKeyFile(source.file));
  const response = await fetch(source.url, {
    signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
    headers: { accept: 'application/json' },
    redirect: 'error',
  });
  if (!response.ok) throw new Error(`GET ${source.url} answered ${response.status}`);
  return JSON.parse(await readLimited(response, MAX_JWKS_BYTES));
}

/**
 * `JWKS_FILE`'s text, if nobody but B's user (or root) can have chosen it. Whoever can rewrite
 * the key set B trusts mints tokens for any object id they know: a file that group or others may
 * write, or that another user owns (and may chmod at will), is refused like an unreadable one.
 * B fails closed rather than warn: it keeps its last good set for `JWKS_MAX_STALE_SECONDS`, then
 * answers 503 KEYS_UNAVAILABLE and says why in its log and on /readyz. Checked on the handle it
 * reads, so the file cannot be swapped between the check and the read.
 */
async function readKeyFile(file: string): Promise<string> {
  const handle = await open(file, 'r');
  try {
    const info = await handle.stat();
    const owner = info.uid === 0 || info.uid === process.getuid?.();
    if ((info.mode & 0o022) !== 0 || !owner) {
      throw new Error(
        `refusing JWKS_FILE ${file}: ${owner ? `group or others may write it (mode ${(info.mode & 0o777).toString(8)})` : `it belongs to another user (uid ${info.uid})`}, who could then mint download tokens; make it 0644 and owned by B's user or root (keys export-jwks writes it so)`,
      );
    }
    return await handle.readFile('utf8');
  } finally {
    await handle.close();
  }
}

/**
 * The body as text, read as it streams and abandoned at `limit` bytes: a hostile or broken
 * endpoint cannot make B hold more than that, whatever its Content-Length says or omits.
 */
async function readLimited(response: Response, limit: number): Promise<string> {
  const tooLarge = () => new Error(`key set is larger than ${limit} bytes`);
  if (Number(response.headers.get('content-length')) > limit) {
    await response.body?.cancel();
    throw tooLarge();
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of response.body ?? []) {
    size += chunk.byteLength;
    if (size > limit) {
      // Leaving the loop early cancels the stream, which closes the connection.
      throw tooLarge();
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

// The curve of each algorithm's keys, and the public members B takes from a JWK: nothing else
// (`d`, `jku`, `x5u`, `x5c`, ...) is ever read.
const CURVES: Record<TokenAlgorithm, { kty: string; crv: string; members: string[] }> = {
  ES256: { kty: 'EC', crv: 'P-256', members: ['x', 'y'] },
  EdDSA: { kty: 'OKP', crv: 'Ed25519', members: ['x'] },
};

/**
 * A good key set: each kid with its algorithm and its key, which jose's `createLocalJWKSet`
 * imported when the set was read. Looking a key up is a `Map` lookup: asking jose's selector for
 * every token (it filters the set and caches imports behind promises) cost more than the rest
 * of B's own verification code together.
 */
type KeySet = Map<string, { alg: TokenAlgorithm; key: CryptoKey }>;

/**
 * The set's key for a token's `kid` and `alg`, or `undefined` when it has none for both (another
 * kid, or a key of another algorithm under this kid: TOKEN_INVALID). The same keys jose's
 * selector gives for `{ kid, alg }`: one per kid, bound to its own algorithm.
 */
function select(keys: KeySet, kid: string, alg: string): CryptoKey | undefined {
  const entry = keys.get(kid);
  return entry?.alg === alg ? entry.key : undefined;
}

interface ImportedKeySet {
  keys: KeySet;
  /** Entries that looked like our signing keys but could not be used: logged and counted. */
  skipped: { kid: unknown; reason: string }[];
}

/**
 * The verification keys of a JWKS for jose's `createLocalJWKSet`, each bound to its own
 * algorithm (the JWK's `alg`, or the one its curve implies) and reduced to its public members.
 * Keys that are not for us (other types or algorithms, encryption keys) are ignored; a broken
 * entry is skipped, so one bad key cannot keep new keys and revocations from reaching B. Every
 * key is imported when the set is read (jose caches it in the selector). Only a set that is not
 * a JWKS at all fails the read.
 */
async function importKeySet(set: unknown): Promise<ImportedKeySet> {
  const list = (set as { keys?: unknown })?.keys;
  if (!Array.isArray(list)) throw new Error('key set has no "keys" array');
  const skipped: ImportedKeySet['skipped'] = [];
  const good: (JWK & { kid: string; alg: TokenAlgorithm })[] = [];
  for (const entry of list) {
    const jwk = (typeof entry === 'object' && entry !== null ? entry : {}) as JWK;
    const alg = jwk.alg ?? algorithmOfCurve(jwk);
    if (!isTokenAlgorithm(alg) || (jwk.use ?? 'sig') !== 'sig') continue;
    const skip = (reason: string) => skipped.push({ kid: jwk.kid, reason });
    const { kty, crv, members } = CURVES[alg];
    if (typeof jwk.kid !== 'string' || jwk.kid.length === 0) {
      skip('no kid');
      continue;
    }
    if (good.some((key) => key.kid === jwk.kid)) {
      skip('duplicate kid');
      continue;
    }
    if (jwk.kty !== kty || jwk.crv !== crv) {
      skip(`${alg} needs a ${kty} key on ${crv}`);
      continue;
    }
    const publicJwk = { kty, crv, kid: jwk.kid, alg, use: 'sig' } as JWK & {
      kid: string;
      alg: TokenAlgorithm;
    };
    for (const member of members)
      (publicJwk as Record<string, unknown>)[member] = (jwk as Record<string, unknown>)[member];
    try {
      // jose must be able to import it; a key it cannot is skipped here, not at the first token.
      await createLocalJWKSet({ keys: [publicJwk] })({ kid: jwk.kid, alg });
    } catch (error) {
      skip(error instanceof Error ? error.message : String(error));
      continue;
    }
    good.push(publicJwk);
  }
  if (good.length === 0) return { keys: new Map(), skipped };
  const selector = createLocalJWKSet({ keys: good });
  // Imported through jose's selector now, once per read: verification never imports a key.
  const imported = await Promise.all(
    good.map(
      async (jwk) =>
        [
          jwk.kid,
          { alg: jwk.alg, key: (await selector({ kid: jwk.kid, alg: jwk.alg })) as CryptoKey },
        ] as const,
    ),
  );
  return { keys: new Map(imported), skipped };
}

function algorithmOfCurve(jwk: JWK): TokenAlgorithm | undefined {
  for (const alg of TOKEN_ALGORITHMS) {
    if (CURVES[alg].kty === jwk.kty && CURVES[alg].crv === jwk.crv) return alg;
  }
  return undefined;
}
