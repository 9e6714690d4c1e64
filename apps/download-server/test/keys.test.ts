import { chmod, chown, rename, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { buildTestApp, createKey, createUnknownKey, jwkOf, type TestKey } from './helpers.ts';

const jwksOf = (...keys: TestKey[]) => ({ keys: keys.map(jwkOf) });

/**
 * A stand-in for A's JWKS endpoint that counts how often B reads it; `undefined` keys: 503.
 * `extra` entries go before the keys' own.
 */
async function jwksServer(keys: TestKey[] | undefined, extra: unknown[] = []) {
  let reads = 0;
  const bodyOf = (next: TestKey[]) => JSON.stringify({ keys: [...extra, ...jwksOf(...next).keys] });
  let body = keys && bodyOf(keys);
  const server: Server = createServer((_request, response) => {
    reads += 1;
    if (body === undefined) response.statusCode = 503;
    response.setHeader('content-type', 'application/json');
    response.end(body ?? '{}');
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  servers.push(server);
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/jwks.json`,
    reads: () => reads,
    publish: (...next: TestKey[]) => {
      body = bodyOf(next);
    },
    stop: () => new Promise<void>((done) => server.close(() => done())),
  };
}

const servers: Server[] = [];
afterEach(async () => {
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise((done) => server.close(done));
  }
});

const head = (app: Awaited<ReturnType<typeof buildTestApp>>['app'], token: string) =>
  app.inject({ method: 'HEAD', url: `/d/${token}` });

const until = async (check: () => Promise<boolean>, ms: number) => {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return true;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return false;
};

describe("B's key set", () => {
  it('with no usable set, a request reads it right then: one read in flight, at most one per second', async () => {
    const key = await createKey();
    // B starts before A is ready (npm start): its first read fails.
    const source = await jwksServer(undefined);
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { key, jwksUrl: source.url });
    expect(source.reads()).toBe(1);
    const file = await t.putFile('on demand');
    const token = await t.mint(file);

    // A burst while A is still down: one read for all of it, then nothing for a second.
    const get = () => t.app.inject({ method: 'GET', url: `/d/${token}` });
    const burst = await Promise.all(Array.from({ length: 20 }, get));
    expect(burst.map((r) => r.statusCode)).toEqual(burst.map(() => 503));
    expect(burst[0]?.json()).toMatchObject({ error: 'KEYS_UNAVAILABLE' });
    expect(source.reads()).toBe(2);
    expect((await head(t.app, token)).statusCode).toBe(503);
    expect(source.reads()).toBe(2);

    // A is ready: the first request after the interval is served, long before B's retry timer.
    source.publish(key);
    await new Promise((resolve) => setTimeout(resolve, 1_050));
    const started = Date.now();
    const served = await get();
    expect(served.statusCode, served.body).toBe(200);
    expect(served.body).toBe('on demand');
    expect(source.reads()).toBe(3);
    expect(Date.now() - started).toBeLessThan(1_000);
    await t.app.keys.ready;
  });

  it('a flood of tokens with unknown kids costs at most one extra fetch per cooldown', async () => {
    const key = await createKey();
    const source = await jwksServer([key]);
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { key, jwksUrl: source.url });
    expect(source.reads()).toBe(1);
    const file = await t.putFile('flood');
    const forged = await Promise.all(
      Array.from({ length: 50 }, async () => {
        const stranger = await createUnknownKey();
        return t.mint(file, { key: stranger.privateKey, kid: stranger.kid });
      }),
    );
    const answers = await Promise.all(forged.map((token) => head(t.app, token)));
    expect(answers.map((a) => a.statusCode)).toEqual(forged.map(() => 403));
    for (const token of forged) expect((await head(t.app, token)).statusCode).toBe(403);
    expect(source.reads()).toBe(2);
  });

  it('learns a key that starts signing at once (first start, or after every key was revoked) on first sight', async () => {
    const old = await createKey();
    const fresh = await createKey();
    const source = await jwksServer([old]);
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { key: old, jwksUrl: source.url });
    source.publish(old, fresh);
    const file = await t.putFile('fresh key');
    const token = await t.mint(file, { key: fresh.privateKey, kid: fresh.kid });
    expect((await head(t.app, token)).statusCode).toBe(200);
  });

  it('re-reads JWKS_FILE as soon as it changes (the CLI export replaces it with a rename)', async () => {
    const first = await createKey();
    const second = await createKey();
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { key: first });
    const file = await t.putFile('watched');
    const token = await t.mint(file, { key: second.privateKey, kid: second.kid });
    // Unknown: refused, and the unknown-kid re-read is now spent for its cooldown.
    expect((await head(t.app, token)).statusCode).toBe(403);
    await writeFile(`${t.jwksFile}.tmp`, JSON.stringify(jwksOf(first, second)), { mode: 0o644 });
    await rename(`${t.jwksFile}.tmp`, t.jwksFile);
    expect(await until(async () => (await head(t.app, token)).statusCode === 200, 3000)).toBe(true);
  });

  // Whoever can rewrite the key set B trusts mints tokens for any object id: B fails closed.
  it.each([
    ['0666', 0o666],
    ['0620', 0o620],
    ['0602', 0o602],
  ])(
    'refuses a JWKS_FILE of mode %s (group or others may write it): 503 KEYS_UNAVAILABLE, /readyz says why',
    async (_label, mode) => {
      const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' });
      const token = await t.mint(await t.putFile('loose key file'));
      expect((await head(t.app, token)).statusCode).toBe(200);
      await t.close();

      await chmod(t.jwksFile, mode);
      const loose = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { dir: t.dir, key: t.key });
      const refused = await head(loose.app, token);
      expect(refused.statusCode).toBe(503);
      const ready = await loose.app.inject({ method: 'GET', url: '/readyz' });
      expect(ready.statusCode).toBe(503);
      expect(ready.json()).toMatchObject({ missing: ['keys'] });
      expect(ready.json().keys.lastError).toContain(
        `refusing JWKS_FILE ${loose.jwksFile}: group or others may write it (mode ${mode.toString(8)})`,
      );

      await chmod(loose.jwksFile, 0o644);
      await loose.app.keys.refresh();
      expect((await head(loose.app, token)).statusCode).toBe(200);
    },
  );

  // Another user who owns the file may chmod and rewrite it whenever they like. Only root can
  // give a file away, which is how this test plants one (CI runs as root).
  it.runIf(process.getuid?.() === 0)('refuses a JWKS_FILE another user owns, even 0644', async () => {
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' });
    const token = await t.mint(await t.putFile('foreign key file'));
    await t.close();
    await chmod(t.jwksFile, 0o644);
    await chown(t.jwksFile, 4242, 4242);
    const foreign = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { dir: t.dir, key: t.key });
    expect((await head(foreign.app, token)).statusCode).toBe(503);
    const ready = await foreign.app.inject({ method: 'GET', url: '/readyz' });
    expect(ready.json().keys.lastError).toContain('it belongs to another user (uid 4242)');
  });

  it('serves on its last good set while A is unreachable, for at most JWKS_MAX_STALE_SECONDS, then fails closed', async () => {
    const key = await createKey();
    const source = await jwksServer([key]);
    const t = await buildTestApp(
      { JWKS_REFRESH_SECONDS: '1', JWKS_MAX_STALE_SECONDS: '3' },
      { key, jwksUrl: source.url },
    );
    const file = await t.putFile('stale');
    const token = await t.mint(file, { ttlSeconds: 600 });
    expect((await head(t.app, token)).statusCode).toBe(200);
    await source.stop();

    // Stale but within the bound: still serving, and saying so.
    expect(
      await until(
        async () => (await t.app.inject({ method: 'GET', url: '/readyz' })).json().keys.stale === true,
        3000,
      ),
    ).toBe(true);
    expect((await head(t.app, token)).statusCode).toBe(200);
    expect((await t.app.inject({ method: 'GET', url: '/metrics' })).body).toMatch(/^jwks_stale 1$/m);

    // Past the bound: 503 KEYS_UNAVAILABLE, and /readyz names the keys.
    expect(await until(async () => (await head(t.app, token)).statusCode === 503, 5000)).toBe(true);
    const ready = await t.app.inject({ method: 'GET', url: '/readyz' });
    expect(ready.statusCode).toBe(503);
    expect(ready.json().missing).toContain('keys');
    const get = await t.app.inject({ method: 'GET', url: `/d/${token}` });
    expect(get.json()).toMatchObject({ error: 'KEYS_UNAVAILABLE' });
  });

  it('accepts each key under its own algorithm only; the allowlist is the algorithms of the set', async () => {
    const es = await createKey(undefined, 'ES256');
    const ed = await createKey(undefined, 'EdDSA');
    const source = await jwksServer([es]);
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { key: es, jwksUrl: source.url });
    const file = await t.putFile('algorithms');
    expect((await head(t.app, await t.mint(file))).statusCode).toBe(200);

    // Only ES256 keys in the set: an EdDSA token is refused before any key lookup, so even an
    // unknown kid does not make B read the set again.
    expect((await head(t.app, await t.mint(file, { key: ed.privateKey, kid: ed.kid }))).statusCode).toBe(403);
    expect(source.reads()).toBe(1);

    // Both algorithms in the set (an EdDSA key from before, an ES256 one now): both sign...
    source.publish(es, ed);
    await t.app.keys.refresh();
    expect([...t.app.keys.algorithms()].sort()).toEqual(['ES256', 'EdDSA']);
    expect((await head(t.app, await t.mint(file, { key: ed.privateKey, kid: ed.kid }))).statusCode).toBe(200);
    expect((await head(t.app, await t.mint(file))).statusCode).toBe(200);
    // ...but a kid never lends its key to the other algorithm: an ES256 token under the EdDSA
    // key's kid (signed with the ES256 key) is refused.
    const confused = await t.mint(file, { kid: ed.kid });
    const answer = await t.app.inject({ method: 'GET', url: `/d/${confused}` });
    expect(answer.statusCode).toBe(403);
    expect(answer.json().error).toBe('TOKEN_INVALID');
  });

  it('skips a broken key in the set (logged and counted), so new keys still arrive', async () => {
    const key = await createKey(undefined, 'ES256');
    const broken = [
      { kid: 'bad-point', kty: 'EC', crv: 'P-256', alg: 'ES256', x: 'AAAA', y: 'AAAA' },
      { kid: 'wrong-curve', kty: 'OKP', crv: 'Ed25519', alg: 'ES256', x: key.publicJwk.x },
      { kty: 'EC', crv: 'P-256', alg: 'ES256', x: key.publicJwk.x, y: key.publicJwk.y },
      { ...jwkOf(key), x: 'not base64url!', kid: key.kid },
      'not even an object',
      // Not for us: ignored without a word.
      { kid: 'rsa', kty: 'RSA', alg: 'RS256', n: 'AQAB', e: 'AQAB' },
    ];
    const source = await jwksServer([key], broken);
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { key, jwksUrl: source.url });
    const file = await t.putFile('broken neighbours');
    // The first broken entry with the real kid is skipped; the real key that follows is a duplicate
    // of a kid that was never imported, so it is taken.
    expect((await head(t.app, await t.mint(file))).statusCode).toBe(200);
    expect(t.app.keys.status()).toMatchObject({ keys: 1, skipped: 4, usable: true });
    expect((await t.app.inject({ method: 'GET', url: '/metrics' })).body).toMatch(/^jwks_keys_skipped 4$/m);

    const next = await createKey(undefined, 'ES256');
    source.publish(key, next);
    await t.app.keys.refresh();
    expect((await head(t.app, await t.mint(file, { key: next.privateKey, kid: next.kid }))).statusCode).toBe(
      200,
    );
  });

  it('stops reading a JWKS body at 1 MiB, whatever the server sends', async () => {
    let sent = 0;
    let closed = false;
    const chunk = Buffer.alloc(64 * 1024, ' ');
    const server = createServer((_request, response) => {
      response.setHeader('content-type', 'application/json');
      response.write('{"keys":[');
      const pump = () => {
        while (!closed && response.write(chunk)) sent += chunk.length;
        if (!closed) response.once('drain', pump);
      };
      response.on('close', () => {
        closed = true;
      });
      pump();
    });
    await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
    servers.push(server);
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks.json`;
    const t = await buildTestApp({ JWKS_REFRESH_SECONDS: '3600' }, { jwksUrl: url });
    expect(t.app.keys.status()).toMatchObject({
      usable: false,
      lastError: expect.stringMatching(/larger than 1048576 bytes/),
    });
    expect(await until(async () => closed, 2000)).toBe(true);
    // What the server got into its socket before B hung up: the limit plus buffers, not gigabytes.
    expect(sent).toBeLessThan(16 * 1024 * 1024);
  });
});
