import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, cp, lstat, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance } from 'fastify';
import {
  calculateJwkThumbprint,
  createLocalJWKSet,
  decodeProtectedHeader,
  exportJWK,
  generateKeyPair,
  type JWK,
  jwtVerify,
} from 'jose';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, inject, it, vi } from 'vitest';
import { buildApp } from '../src/app.ts';
import { type AppConfig, loadConfig } from '../src/config.ts';
import { KeyLifecycle } from '../src/keys/lifecycle.ts';
import { createSigningKey } from '../src/keys/material.ts';
import { migrate } from '../src/plugins/db.ts';
import { type SigningKeyRecord, signingKeysRepository } from '../src/repositories/signing-keys.ts';
import { buildTestApp, TEST_SESSION_SECRET, TestClient, useTestDatabase } from './helpers.ts';

// The signing-key lifecycle of the README's "Signing keys": next → current → previous → removed,
// scheduled rotation, emergency revocation, keys sealed at rest, one actor at a time, the CLI.
// Times are passed to the lifecycle explicitly; nothing here sleeps for a key to change state
// except the replica test, which waits for A's real poll timer.

const db = useTestDatabase();
const ROOT = fileURLToPath(new URL('../../..', import.meta.url));
const DAY_MS = 24 * 3600 * 1000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const JWKS = { method: 'GET', url: '/.well-known/jwks.json' } as const;
// Private members of any JWK key type: none may ever be published.
const PRIVATE_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'];

// A pool of the test's own, standing in for "another replica" or the CLI: the repository and the
// lifecycle used directly, and the raw table for what the repository does not show.
let pool: pg.Pool;
beforeAll(async () => {
  pool = new pg.Pool({ connectionString: db().url, max: 4 });
  await migrate(pool);
});
afterAll(async () => {
  await pool?.end();
});
// Every test starts without keys; apps of earlier tests are closed by then (onTestFinished).
beforeEach(async () => {
  await pool.query('DELETE FROM signing_keys');
});

const lifecycleOf = (config: AppConfig) =>
  new KeyLifecycle(config.keyPolicy, () => createSigningKey(config.kek));

async function publishedJwks(app: FastifyInstance): Promise<JWK[]> {
  const response = await app.inject(JWKS);
  expect(response.statusCode).toBe(200);
  return response.json<{ keys: JWK[] }>().keys;
}
const publishedKids = async (app: FastifyInstance) => (await publishedJwks(app)).map((key) => key.kid).sort();

const byKid = (keys: SigningKeyRecord[], kid: string) => keys.find((key) => key.kid === kid);

/** A signed-in user with one uploaded file, and a function that mints a token for it. */
async function downloader(app: FastifyInstance) {
  const client = new TestClient(app);
  await client.register();
  const upload = await client.upload('keys.txt', 'signed with the current key', 'text/plain');
  expect(upload.statusCode).toBe(201);
  const { id } = upload.json<{ file: { id: string } }>().file;
  return async function mint(): Promise<{ token: string; kid: string }> {
    const response = await client.request({ method: 'POST', url: `/api/files/${id}/download-token` });
    expect(response.statusCode).toBe(201);
    const { token } = response.json<{ token: string }>();
    return { token, kid: decodeProtectedHeader(token).kid as string };
  };
}

async function privateKeyColumn(kid: string): Promise<string | undefined> {
  const { rows } = await pool.query<{ private_key: string }>(
    'SELECT private_key FROM signing_keys WHERE kid = $1',
    [kid],
  );
  return rows[0]?.private_key;
}

describe('first start', () => {
  it('creates exactly one current key; the JWKS lists it with public members only', async () => {
    const { app, config } = await buildTestApp(db());
    const keys = await app.repos.signingKeys.list();
    expect(keys).toHaveLength(1);
    const [key] = keys as [SigningKeyRecord];
    expect(key).toMatchObject({ state: 'current', alg: 'ES256', revokedAt: null });
    expect(key.activatedAt).toBeInstanceOf(Date);

    const response = await app.inject(JWKS);
    expect(response.statusCode).toBe(200);
    const maxAge = /max-age=(\d+)/.exec(String(response.headers['cache-control']))?.[1];
    expect(maxAge).toBeDefined();
    expect(Number(maxAge)).toBeLessThanOrEqual(config.JWKS_REFRESH_SECONDS);

    const published = response.json<{ keys: JWK[] }>().keys;
    expect(published).toEqual([
      expect.objectContaining({ kid: key.kid, kty: 'EC', crv: 'P-256', alg: 'ES256', use: 'sig' }),
    ]);
    for (const member of PRIVATE_MEMBERS) expect(published[0]).not.toHaveProperty(member);
  });

  it('keeps the max-age within a short refresh interval, and a restart keeps the key', async () => {
    const first = await buildTestApp(db(), { JWKS_REFRESH_SECONDS: '7' });
    const response = await first.app.inject(JWKS);
    expect(response.headers['cache-control']).toMatch(/max-age=[0-7]\b/);
    const [kid] = await publishedKids(first.app);
    await first.app.close();

    const second = await buildTestApp(db(), { JWKS_REFRESH_SECONDS: '7' });
    expect((await second.app.repos.signingKeys.list()).map((key) => [key.kid, key.state])).toEqual([
      [kid, 'current'],
    ]);
  });
});

describe('rotation', () => {
  it('the policy follows the configuration', () => {
    const config = loadConfig({ JWKS_REFRESH_SECONDS: '3', TOKEN_TTL_SECONDS: '30', KEY_ROTATION_DAYS: '2' });
    expect(config.keyPolicy).toEqual({
      activationDelayMs: 2 * 3 * 1000,
      retentionMs: (30 + 60) * 1000,
      rotationIntervalMs: 2 * DAY_MS,
    });
  });

  it('next is published but does not sign before activatesAt; then current, previous, removed', async () => {
    // Default refresh interval (60 s): A's own poll (real clock) cannot promote anything during
    // the test, so only the explicit times below move the keys.
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const mint = await downloader(app);
    const old = (await repo.current()) as SigningKeyRecord;

    const t0 = new Date();
    const next = (await repo.locked((keys) => lifecycle.rotate(keys, t0))) as SigningKeyRecord;
    expect(next).toMatchObject({ state: 'next', activatedAt: null });
    expect(next.kid).not.toBe(old.kid);
    expect(next.activatesAt?.getTime()).toBe(t0.getTime() + config.keyPolicy.activationDelayMs);
    expect(config.keyPolicy.activationDelayMs).toBe(2 * config.JWKS_REFRESH_SECONDS * 1000);

    // Published at once, so B can learn it long before it signs...
    expect(await publishedKids(app)).toEqual([old.kid, next.kid].sort());
    // ...but not signing yet.
    expect((await mint()).kid).toBe(old.kid);

    const activatesAt = next.activatesAt as Date;
    await repo.locked((keys) => lifecycle.advance(keys, new Date(activatesAt.getTime() - 1)));
    expect((await repo.current())?.kid).toBe(old.kid);
    expect((await mint()).kid).toBe(old.kid);

    await repo.locked((keys) => lifecycle.advance(keys, activatesAt));
    let keys = await repo.list();
    expect(keys).toHaveLength(2);
    expect(byKid(keys, next.kid)).toMatchObject({ state: 'current', activatedAt: activatesAt });
    const retiresAt = new Date(activatesAt.getTime() + config.keyPolicy.retentionMs);
    expect(config.keyPolicy.retentionMs).toBe((config.TOKEN_TTL_SECONDS + 60) * 1000);
    expect(byKid(keys, old.kid)).toMatchObject({ state: 'previous', retiredAt: activatesAt, retiresAt });
    // Both published: the old key's tokens are still out there.
    expect(await publishedKids(app)).toEqual([old.kid, next.kid].sort());

    await repo.locked((keys) => lifecycle.advance(keys, new Date(retiresAt.getTime() - 1)));
    expect(byKid(await repo.list(), old.kid)?.state).toBe('previous');

    await repo.locked((keys) => lifecycle.advance(keys, retiresAt));
    keys = await repo.list();
    expect(keys.map((key) => [key.kid, key.state])).toEqual([[next.kid, 'current']]);
    expect(await publishedKids(app)).toEqual([next.kid]);
    expect(await privateKeyColumn(old.kid)).toBeUndefined();
  });

  it('an EdDSA key made before ES256 keeps signing, published as EdDSA, until a rotation hands over to ES256', async () => {
    // A database from before the algorithm changed: its current key is Ed25519.
    const legacy = await generateKeyPair('EdDSA', { extractable: true });
    const legacyJwk = await exportJWK(legacy.publicKey);
    const legacyKid = await calculateJwkThumbprint(legacyJwk);
    const now = new Date();
    await signingKeysRepository(pool).insert(
      {
        kid: legacyKid,
        alg: 'EdDSA',
        publicJwk: legacyJwk,
        privateKey: JSON.stringify(await exportJWK(legacy.privateKey)),
      },
      'current',
      now,
      now,
    );
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const mint = await downloader(app);
    const verifyWithJwks = async (token: string) =>
      jwtVerify(token, createLocalJWKSet({ keys: await publishedJwks(app) }), {
        issuer: 'http://a.test',
        audience: 'http://b.test',
        typ: 'dl+jwt',
        algorithms: ['ES256', 'EdDSA'],
      });

    const before = await mint();
    expect(before.kid).toBe(legacyKid);
    expect((await verifyWithJwks(before.token)).protectedHeader.alg).toBe('EdDSA');

    const next = (await repo.locked((keys) =>
      lifecycleOf(config).rotate(keys, new Date()),
    )) as SigningKeyRecord;
    expect(next.alg).toBe('ES256');
    expect((await publishedJwks(app)).map((key) => [key.kid, key.alg, key.kty]).sort()).toEqual(
      [
        [legacyKid, 'EdDSA', 'OKP'],
        [next.kid, 'ES256', 'EC'],
      ].sort(),
    );
    await repo.locked((keys) => lifecycleOf(config).advance(keys, next.activatesAt as Date));
    // A's own poll picks up the new current key.
    await vi.waitFor(async () => expect((await mint()).kid).toBe(next.kid), { timeout: 5000, interval: 100 });
    const after = await mint();
    expect((await verifyWithJwks(after.token)).protectedHeader.alg).toBe('ES256');
    // The EdDSA key's tokens still verify while it is previous.
    expect((await verifyWithJwks(before.token)).protectedHeader.kid).toBe(legacyKid);
  });

  it('scheduled: a next key once the current one is KEY_ROTATION_DAYS old, only one at a time', async () => {
    const { app, config } = await buildTestApp(db(), { KEY_ROTATION_DAYS: '1' });
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const current = (await repo.current()) as SigningKeyRecord;
    const since = (current.activatedAt as Date).getTime();
    const advance = (at: number) => repo.locked((keys) => lifecycle.advance(keys, new Date(at)));
    const nextKeys = async () => (await repo.list()).filter((key) => key.state === 'next');

    await advance(since + DAY_MS - 1000);
    expect(await nextKeys()).toEqual([]);

    await advance(since + DAY_MS);
    const [scheduled, ...more] = (await nextKeys()) as [SigningKeyRecord, ...SigningKeyRecord[]];
    expect(scheduled).toBeDefined();
    expect(more).toEqual([]);
    expect(scheduled).toMatchObject({
      createdAt: new Date(since + DAY_MS),
      activatesAt: new Date(since + DAY_MS + config.keyPolicy.activationDelayMs),
    });
    expect((await repo.current())?.kid).toBe(current.kid);

    // While one waits, later advances do not start another.
    await advance(since + DAY_MS);
    await advance(since + DAY_MS + 1000);
    expect((await nextKeys()).map((key) => key.kid)).toEqual([scheduled.kid]);

    // It takes over on time, and the fresh current key is not due for a day.
    const activatesAt = (scheduled.activatesAt as Date).getTime();
    await advance(activatesAt);
    expect((await repo.current())?.kid).toBe(scheduled.kid);
    await advance(activatesAt + 1000);
    expect(await nextKeys()).toEqual([]);
  });

  it('a replica signs with a new current key within its poll interval (2 s)', async () => {
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const mint = await downloader(app);
    const before = (await mint()).kid;

    // Another replica (or the CLI) rotates and promotes through the database.
    const next = (await repo.locked((keys) => lifecycle.rotate(keys, new Date()))) as SigningKeyRecord;
    await repo.locked((keys) => lifecycle.advance(keys, next.activatesAt as Date));
    expect((await repo.current())?.kid).toBe(next.kid);

    const started = Date.now();
    let kid = before;
    while (kid === before && Date.now() - started < 5_000) {
      await sleep(100);
      kid = (await mint()).kid;
    }
    const elapsed = Date.now() - started;
    console.log(`replica picked up the new current key after ${elapsed} ms`);
    expect(kid).toBe(next.kid);
    expect(elapsed).toBeLessThanOrEqual(3_000);
  });
});

describe('revocation', () => {
  it('revoking current with a next key waiting: the next key signs at once', async () => {
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const old = (await repo.current()) as SigningKeyRecord;
    const now = new Date();
    const next = (await repo.locked((keys) => lifecycle.rotate(keys, now))) as SigningKeyRecord;

    const revokedAt = new Date(now.getTime() + 1000); // long before next.activatesAt
    expect(await repo.locked((keys) => lifecycle.revoke(keys, old.kid, revokedAt))).toBe('current');
    const keys = await repo.list();
    expect(keys).toHaveLength(2);
    expect(byKid(keys, next.kid)).toMatchObject({ state: 'current', activatedAt: revokedAt });
    expect(byKid(keys, old.kid)).toMatchObject({ state: 'revoked', revokedAt, privateKey: '' });
    expect(await privateKeyColumn(old.kid)).toBe('');
    expect(await publishedKids(app)).toEqual([next.kid]);
  });

  it('revoking current without a next key: a brand-new key is current at once', async () => {
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const old = (await repo.current()) as SigningKeyRecord;
    const now = new Date();

    expect(await repo.locked((keys) => lifecycle.revoke(keys, old.kid, now))).toBe('current');
    const current = (await repo.current()) as SigningKeyRecord;
    expect(current.kid).not.toBe(old.kid);
    expect(current).toMatchObject({ state: 'current', createdAt: now, activatedAt: now });
    expect((await repo.list()).map((key) => key.state).sort()).toEqual(['current', 'revoked']);
    expect(await privateKeyColumn(old.kid)).toBe('');
    expect(await publishedKids(app)).toEqual([current.kid]);
  });

  it('revoking a next or previous key unpublishes it and leaves the current key alone', async () => {
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const first = (await repo.current()) as SigningKeyRecord;
    const now = new Date();
    const second = (await repo.locked((keys) => lifecycle.rotate(keys, now))) as SigningKeyRecord;
    await repo.locked((keys) => lifecycle.advance(keys, second.activatesAt as Date));
    const third = (await repo.locked((keys) => lifecycle.rotate(keys, now))) as SigningKeyRecord;
    expect(await publishedKids(app)).toEqual([first.kid, second.kid, third.kid].sort());

    expect(await repo.locked((keys) => lifecycle.revoke(keys, first.kid, now))).toBe('previous');
    expect(await repo.locked((keys) => lifecycle.revoke(keys, third.kid, now))).toBe('next');
    expect((await repo.current())?.kid).toBe(second.kid);
    expect(await publishedKids(app)).toEqual([second.kid]);
    expect(await privateKeyColumn(first.kid)).toBe('');
    expect(await privateKeyColumn(third.kid)).toBe('');
  });

  it('revoking an unknown or already revoked kid returns undefined and changes nothing', async () => {
    const { app, config } = await buildTestApp(db());
    const repo = app.repos.signingKeys;
    const lifecycle = lifecycleOf(config);
    const old = (await repo.current()) as SigningKeyRecord;
    expect(await repo.locked((keys) => lifecycle.revoke(keys, 'no-such-kid', new Date()))).toBeUndefined();
    expect(await repo.list()).toEqual([old]);

    expect(await repo.locked((keys) => lifecycle.revoke(keys, old.kid, new Date()))).toBe('current');
    const after = await repo.list();
    expect(await repo.locked((keys) => lifecycle.revoke(keys, old.kid, new Date()))).toBeUndefined();
    expect(await repo.list()).toEqual(after);
  });
});

describe('one actor at a time', () => {
  it('concurrent locked(advance) calls leave exactly one current key and no duplicate next key', async () => {
    const config = loadConfig({ KEY_ROTATION_DAYS: '1' });
    const lifecycle = lifecycleOf(config);
    // Two "replicas": two pools on the same database.
    const other = new pg.Pool({ connectionString: db().url, max: 2 });
    try {
      const replicas = [signingKeysRepository(pool), signingKeysRepository(other)];
      const now = new Date();
      await Promise.all(
        [...replicas, ...replicas].map((repo) => repo.locked((keys) => lifecycle.advance(keys, now))),
      );
      let keys = await replicas[0]?.list();
      expect(keys?.map((key) => key.state)).toEqual(['current']);

      // Rotation due everywhere at once: one successor, not one per replica.
      const due = new Date(now.getTime() + DAY_MS);
      await Promise.all(
        [...replicas, ...replicas].map((repo) => repo.locked((keys) => lifecycle.advance(keys, due))),
      );
      keys = await replicas[0]?.list();
      expect(keys?.map((key) => key.state).sort()).toEqual(['current', 'next']);
    } finally {
      await other.end();
    }
  });

  it('locked(fn, { wait: false }) gives up while another transaction holds the lock', async () => {
    const repo = signingKeysRepository(pool);
    let release = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    let entered = () => {};
    const inside = new Promise<void>((resolve) => {
      entered = resolve;
    });
    const holder = repo.locked(async () => {
      entered();
      await gate;
      return 'held';
    });
    await inside;
    const fn = vi.fn(async () => 'ran');

    if (process.env.TEST_DATABASE_URL) {
      expect(await repo.locked(fn, { wait: false })).toBeUndefined();
      expect(fn).not.toHaveBeenCalled();
      release();
      expect(await holder).toBe('held');
      expect(await repo.locked(fn, { wait: false })).toBe('ran');
    } else {
      // Embedded PGlite is one backend: its socket server runs one transaction at a time, so
      // the second transaction's BEGIN queues until the holder commits and cannot even ask for
      // the lock meanwhile. Exclusion holds all the same: fn does not run while the lock is held.
      const second = repo.locked(fn, { wait: false });
      expect(await Promise.race([second, sleep(300).then(() => 'still waiting')])).toBe('still waiting');
      expect(fn).not.toHaveBeenCalled();
      release();
      expect(await holder).toBe('held');
      expect(await second).toBe('ran');
    }
  });
});

describe('KEY_ENCRYPTION_KEY', () => {
  /** Builds A and expects it to fail at start; cleans up what buildTestApp would have. */
  async function startFails(env: Record<string, string>): Promise<Error> {
    const dir = await mkdtemp(join(tmpdir(), 'sfh-app-'));
    try {
      const config = loadConfig({ DATA_DIR: dir, LOG_LEVEL: 'silent', ...env });
      const error = await buildApp(config, {
        databaseUrl: db().url,
        sessionSecret: TEST_SESSION_SECRET,
      }).then(
        () => undefined,
        (error: unknown) => error,
      );
      expect(error).toBeInstanceOf(Error);
      return error as Error;
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  it('seals private keys at rest; A still mints tokens that verify; a wrong or missing KEK stops A', async () => {
    const kek = randomBytes(32).toString('base64url');
    const { app, config } = await buildTestApp(db(), { KEY_ENCRYPTION_KEY: kek });
    const current = (await app.repos.signingKeys.current()) as SigningKeyRecord;
    const stored = (await privateKeyColumn(current.kid)) as string;
    expect(stored.startsWith('aes256gcm.')).toBe(true);
    expect(stored).not.toMatch(/[{}":]/);
    expect(stored).not.toContain(current.publicJwk.x as string);
    // A rotated key is sealed too.
    const next = (await app.repos.signingKeys.locked((keys) =>
      lifecycleOf(config).rotate(keys, new Date()),
    )) as SigningKeyRecord;
    expect((await privateKeyColumn(next.kid))?.startsWith('aes256gcm.')).toBe(true);

    const mint = await downloader(app);
    const { token, kid } = await mint();
    expect(kid).toBe(current.kid);
    const { payload, protectedHeader } = await jwtVerify(
      token,
      createLocalJWKSet({ keys: await publishedJwks(app) }),
      { issuer: 'http://a.test', audience: 'http://b.test', typ: 'dl+jwt', algorithms: ['ES256'] },
    );
    expect(protectedHeader.kid).toBe(current.kid);
    expect(payload.sub).toEqual(expect.any(String));
    await app.close();

    const wrong = await startFails({ KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64url') });
    expect(wrong.message).toContain('KEY_ENCRYPTION_KEY');
    const missing = await startFails({});
    expect(missing.message).toContain('KEY_ENCRYPTION_KEY');

    // The keys are untouched by the failed starts, and the right KEK opens them again.
    expect(await privateKeyColumn(current.kid)).toBe(stored);
    const again = await buildTestApp(db(), { KEY_ENCRYPTION_KEY: kek });
    expect((await (await downloader(again.app))()).kid).toBe(current.kid);
  });

  it('with a KEK, A refuses a plain private key (one written without the KEK)', async () => {
    await buildTestApp(db()).then(({ app }) => app.close()); // a plain current key, as without a KEK
    const refused = await startFails({ KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64url') });
    expect(refused.message).toMatch(/stored unencrypted although KEY_ENCRYPTION_KEY is set/);
  });

  it('no replica removes the key it still signs with, even past its retirement', async () => {
    const config = loadConfig({ JWKS_REFRESH_SECONDS: '1' });
    const lifecycle = lifecycleOf(config);
    const repo = signingKeysRepository(pool);
    const start = new Date();
    await repo.locked((keys) => lifecycle.advance(keys, start));
    const old = (await repo.current()) as SigningKeyRecord;
    await repo.locked((keys) => lifecycle.rotate(keys, start));
    // The successor becomes current; the old key is previous until its retention is over.
    const promoted = new Date(start.getTime() + config.keyPolicy.activationDelayMs + 1_000);
    await repo.locked((keys) => lifecycle.advance(keys, promoted));
    expect(byKid(await repo.list(), old.kid)?.state).toBe('previous');
    // Long past its retention, but this replica could not open the successor and still signs
    // with the old key: it stays published.
    const later = new Date(promoted.getTime() + config.keyPolicy.retentionMs + 60_000);
    await repo.locked((keys) => lifecycle.advance(keys, later, old.kid));
    expect(byKid(await repo.list(), old.kid)?.state).toBe('previous');
    // Once no one signs with it, it goes.
    await repo.locked((keys) => lifecycle.advance(keys, later));
    expect(byKid(await repo.list(), old.kid)).toBeUndefined();
  });

  it('without a KEK keys are stored in plain JSON (development)', async () => {
    const { app } = await buildTestApp(db());
    const current = (await app.repos.signingKeys.current()) as SigningKeyRecord;
    const stored = (await privateKeyColumn(current.kid)) as string;
    expect(JSON.parse(stored)).toMatchObject({ kty: 'EC', crv: 'P-256', d: expect.any(String) });
  });
});

describe('ops CLI (npm run keys)', () => {
  interface CliResult {
    code: number;
    stdout: string;
    stderr: string;
  }
  interface KeyView {
    kid: string;
    state: string;
    createdAt: string;
    activatesAt: string | null;
  }

  /** Runs the CLI as `npm run keys` does, with A's environment pointing at the test database. */
  function cli(...args: string[]): Promise<CliResult> {
    return cliWith({}, ...args);
  }

  /** The CLI with more environment (a KEY_ENCRYPTION_KEY). */
  function cliWith(env: Record<string, string>, ...args: string[]): Promise<CliResult> {
    return new Promise((resolve, reject) => {
      execFile(
        process.execPath,
        ['--import', 'tsx', 'apps/app-server/src/keys-cli.ts', ...args],
        {
          cwd: ROOT,
          env: {
            DATABASE_URL: db().url,
            JWKS_REFRESH_SECONDS: '1',
            PATH: process.env.PATH,
            HOME: process.env.HOME,
            ...env,
          },
          timeout: 30_000,
        },
        (error, stdout, stderr) => {
          if (error && typeof error.code !== 'number') reject(error);
          else resolve({ code: error ? (error.code as number) : 0, stdout, stderr });
        },
      );
    });
  }

  const repo = () => signingKeysRepository(pool);
  /** One current key, as A's first start leaves it (no A running: nothing moves behind our back). */
  async function seeded(): Promise<SigningKeyRecord> {
    const lifecycle = lifecycleOf(loadConfig({ JWKS_REFRESH_SECONDS: '1' }));
    await repo().locked((keys) => lifecycle.advance(keys, new Date()));
    return (await repo().current()) as SigningKeyRecord;
  }

  it('list: a header line and one line per key; --json before or after the command', async () => {
    const current = await seeded();
    const next = (await repo().locked((keys) =>
      lifecycleOf(loadConfig({ JWKS_REFRESH_SECONDS: '1' })).rotate(keys, new Date()),
    )) as SigningKeyRecord;

    const [text, before, after] = await Promise.all([
      cli('list'),
      cli('--json', 'list'),
      cli('list', '--json'),
    ]);
    expect(text).toMatchObject({ code: 0 });
    const lines = text.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(3);
    expect(lines[0]).toMatch(/^KID\s+STATE\s+CREATED\s+ACTIVATED\s+RETIRES$/);
    const lineOf = (kid: string) => lines.find((line) => line.startsWith(kid)) as string;
    expect(lineOf(current.kid).split(/\s+/)[1]).toBe('current');
    expect(lineOf(next.kid).split(/\s+/)[1]).toBe('next');

    for (const result of [before, after]) {
      expect(result.code).toBe(0);
      const list = JSON.parse(result.stdout) as KeyView[];
      expect(Array.isArray(list)).toBe(true);
      expect(list).toEqual([
        expect.objectContaining({
          kid: current.kid,
          state: 'current',
          createdAt: current.createdAt.toISOString(),
        }),
        expect.objectContaining({ kid: next.kid, state: 'next', createdAt: next.createdAt.toISOString() }),
      ]);
    }
  }, 60_000);

  it('rotate publishes a next key that signs after 2 × JWKS_REFRESH_SECONDS', async () => {
    const current = await seeded();
    const result = await cli('rotate');
    expect(result.code).toBe(0);
    const next = (await repo().list()).find((key) => key.state === 'next') as SigningKeyRecord;
    expect(next).toBeDefined();
    expect(result.stdout).toContain(next.kid);
    expect(result.stdout).toContain('next');
    expect((next.activatesAt as Date).getTime() - next.createdAt.getTime()).toBe(2_000);
    expect((await repo().current())?.kid).toBe(current.kid);
  }, 60_000);

  it('revoke <current kid>: revoked at once, another key current', async () => {
    const current = await seeded();
    const result = await cli('revoke', current.kid);
    expect(result.code).toBe(0);
    expect(result.stdout).toContain(current.kid);

    const list = await cli('list', '--json');
    expect(list.code).toBe(0);
    const keys = JSON.parse(list.stdout) as KeyView[];
    expect(keys.find((key) => key.kid === current.kid)?.state).toBe('revoked');
    const now = keys.filter((key) => key.state === 'current');
    expect(now).toHaveLength(1);
    expect(now[0]?.kid).not.toBe(current.kid);
    expect(await privateKeyColumn(current.kid)).toBe('');
  }, 60_000);

  it('refuses to write without the KEK, or with a wrong one, while the keys are sealed', async () => {
    const kek = randomBytes(32).toString('base64url');
    const sealed = lifecycleOf(loadConfig({ JWKS_REFRESH_SECONDS: '1', KEY_ENCRYPTION_KEY: kek }));
    await repo().locked((keys) => sealed.advance(keys, new Date()));
    const current = (await repo().current()) as SigningKeyRecord;
    const before = (await repo().list()).map((key) => key.kid);

    const without = await cli('rotate');
    expect(without.code).toBe(1);
    expect(without.stderr).toMatch(/encrypted; set KEY_ENCRYPTION_KEY/);
    const wrong = await cliWith({ KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64url') }, 'rotate');
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/wrong KEY_ENCRYPTION_KEY/);
    const revoke = await cli('revoke', 'no-such-kid');
    expect(revoke.code).toBe(1);
    expect((await repo().list()).map((key) => key.kid)).toEqual(before);

    // With the right KEK it writes, and what it writes is sealed.
    const right = await cliWith({ KEY_ENCRYPTION_KEY: kek }, '--json', 'rotate');
    expect(right.code).toBe(0);
    const added = JSON.parse(right.stdout) as KeyView;
    expect((await privateKeyColumn(added.kid))?.startsWith('aes256gcm.')).toBe(true);
    expect((await repo().current())?.kid).toBe(current.kid);
  });

  it('exit 1 on a failure, 2 on wrong usage', async () => {
    await seeded();
    const nope = await cli('revoke', 'nope');
    const unknown = await cli('frobnicate');
    const missing = await cli('revoke');
    expect(nope.code).toBe(1);
    expect(nope.stderr).toContain('nope');
    expect(unknown.code).toBe(2);
    expect(missing.code).toBe(2);
    expect((await repo().list()).map((key) => key.state)).toEqual(['current']);
  }, 60_000);

  it('two invocations at once both succeed (while A or another CLI starts, migrations wait)', async () => {
    await seeded();
    // Each process applies pending migrations first, under node-pg-migrate's advisory lock; one
    // that finds the lock taken must wait for it, not fail.
    const results = await Promise.all([cli('list', '--json'), cli('list', '--json'), cli('list', '--json')]);
    expect(results.map((result) => [result.code, result.stderr])).toEqual([
      [0, ''],
      [0, ''],
      [0, ''],
    ]);
  }, 60_000);

  it('export-jwks <file> writes the public set, without private members', async () => {
    const current = await seeded();
    const lifecycle = lifecycleOf(loadConfig({ JWKS_REFRESH_SECONDS: '1' }));
    const next = (await repo().locked((keys) => lifecycle.rotate(keys, new Date()))) as SigningKeyRecord;
    const gone = (await repo().locked((keys) => lifecycle.rotate(keys, new Date()))) as SigningKeyRecord;
    await repo().locked((keys) => lifecycle.revoke(keys, gone.kid, new Date()));

    const dir = await mkdtemp(join(tmpdir(), 'sfh-jwks-'));
    try {
      const file = join(dir, 'jwks.json');
      const result = await cli('export-jwks', file);
      expect(result.code).toBe(0);
      const set = JSON.parse(await readFile(file, 'utf8')) as { keys: JWK[] };
      expect(set.keys.map((key) => key.kid).sort()).toEqual([current.kid, next.kid].sort());
      for (const key of set.keys) {
        expect(key).toMatchObject({
          kty: 'EC',
          crv: 'P-256',
          alg: 'ES256',
          x: expect.any(String),
          y: expect.any(String),
        });
        for (const member of PRIVATE_MEMBERS) expect(key).not.toHaveProperty(member);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);

  // In a folder others can write, the old fixed `<file>.tmp` let another local user plant a link
  // (the CLI wrote through it) or own the key set B then trusts.
  it('export-jwks never writes through a link planted at <file>.tmp; the set is 0644, nothing else left', async () => {
    await seeded();
    const dir = await mkdtemp(join(tmpdir(), 'sfh-jwks-'));
    try {
      await chmod(dir, 0o1777); // shared, like /tmp
      const victim = join(dir, 'victim');
      await writeFile(victim, 'not yours\n', { mode: 0o600 });
      const file = join(dir, 'jwks.json');
      await symlink(victim, `${file}.tmp`);
      const result = await cli('export-jwks', file);
      expect(result, result.stderr).toMatchObject({ code: 0 });
      expect(await readFile(victim, 'utf8')).toBe('not yours\n');
      expect((await lstat(`${file}.tmp`)).isSymbolicLink()).toBe(true);
      const info = await lstat(file);
      expect(info.isFile()).toBe(true);
      expect(info.mode & 0o7777).toBe(0o644);
      expect(info.uid).toBe(process.getuid?.());
      expect((JSON.parse(await readFile(file, 'utf8')) as { keys: JWK[] }).keys).toHaveLength(1);
      expect((await readdir(dir)).sort()).toEqual(['jwks.json', 'jwks.json.tmp', 'victim']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);

  // On the embedded database the CLI makes DATA_DIR private first (umask 077): the public set
  // must still be readable by a B running as another user.
  it('export-jwks on the embedded database: the set is 0644 all the same', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'sfh-jwks-embedded-'));
    try {
      await cp(inject('pgliteTemplate'), join(dir, 'data', 'pg'), { recursive: true });
      const file = join(dir, 'jwks.json');
      const result = await cliWith({ DATABASE_URL: '', DATA_DIR: join(dir, 'data') }, 'rotate');
      expect(result, result.stderr).toMatchObject({ code: 0 });
      expect(
        (await cliWith({ DATABASE_URL: '', DATA_DIR: join(dir, 'data') }, 'export-jwks', file)).code,
      ).toBe(0);
      expect((await lstat(file)).mode & 0o7777).toBe(0o644);
      expect((await lstat(join(dir, 'data'))).mode & 0o777).toBe(0o700);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it('export-jwks refuses a folder anyone can write without the sticky bit (exit 1, nothing written)', async () => {
    await seeded();
    const dir = await mkdtemp(join(tmpdir(), 'sfh-jwks-'));
    try {
      await chmod(dir, 0o777);
      const file = join(dir, 'jwks.json');
      const result = await cli('export-jwks', file);
      expect(result.code).toBe(1);
      expect(result.stderr).toContain(`refusing to write ${file}: any user can write to ${dir}`);
      expect(await readdir(dir)).toEqual([]);
      // A folder only its owner writes is fine.
      await chmod(dir, 0o755);
      expect((await cli('export-jwks', file)).code).toBe(0);
      expect((await lstat(file)).mode & 0o7777).toBe(0o644);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);
});
