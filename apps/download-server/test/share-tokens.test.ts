/**
 * Tokens minted through a share link (`sub` `share:<id>`, `shr`): B serves them like any token,
 * and renews a spent or expired one at the share page, never at A's signed-in routes
 * (README, "Sharing").
 */
import { describe, expect, it } from 'vitest';
import { buildTestApp, ISSUER, signRaw } from './helpers.ts';

const BROWSER_ACCEPT = 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8';
const SHARE = 'Sh4re_id-0123456789abc';

async function shareToken(options: { now?: Date } = {}) {
  const t = await buildTestApp();
  const file = { ...(await t.putFile('shared bytes')), shr: SHARE };
  const token = await t.mint(file, { subject: `share:${SHARE}`, ...options });
  return { ...t, file, token };
}

const get = (t: { app: import('fastify').FastifyInstance }, token: string, accept = 'application/json') =>
  t.app.inject({ method: 'GET', url: `/d/${token}`, headers: { accept } });

describe('share tokens on B', () => {
  it('downloads once; a used one sends a browser to the share page (303), others get renewUrl', async () => {
    const t = await shareToken();
    const first = await get(t, t.token);
    expect(first.statusCode).toBe(200);
    expect(first.body).toBe('shared bytes');

    const browser = await get(t, t.token, BROWSER_ACCEPT);
    expect(browser.statusCode).toBe(303);
    expect(browser.headers.location).toBe(`${ISSUER}/s/${SHARE}`);

    const api = await get(t, t.token);
    expect(api.statusCode).toBe(410);
    expect(api.json()).toMatchObject({ error: 'TOKEN_USED', renewUrl: `${ISSUER}/s/${SHARE}` });
    expect(JSON.stringify(api.json())).not.toContain('/files/');
  });

  it('an expired share token is renewed at the share page too', async () => {
    const t = await shareToken({ now: new Date(Date.now() - 10 * 60_000) });
    const browser = await get(t, t.token, BROWSER_ACCEPT);
    expect(browser.statusCode).toBe(303);
    expect(browser.headers.location).toBe(`${ISSUER}/s/${SHARE}`);
    const api = await get(t, t.token);
    expect(api.statusCode).toBe(403);
    expect(api.json()).toMatchObject({ error: 'TOKEN_EXPIRED', renewUrl: `${ISSUER}/s/${SHARE}` });
  });

  it('refuses a signed token whose shr is malformed or disagrees with sub, before storage', async () => {
    const t = await buildTestApp();
    const file = await t.putFile('x');
    const now = Math.floor(Date.now() / 1000);
    const claims = {
      iss: ISSUER,
      aud: 'http://b.test',
      jti: 'V1StGXR8_Z5jdHi6B-myT',
      iat: now,
      nbf: now - 5,
      exp: now + 60,
      ...file,
    };
    for (const extra of [
      { sub: 'user-1', shr: SHARE },
      { sub: 'share:a/b', shr: 'a/b' },
      { sub: 'share:1', shr: 1 },
    ]) {
      const token = await signRaw({ ...claims, ...extra }, t.key);
      const res = await get(t, token, BROWSER_ACCEPT);
      expect(res.statusCode).toBe(403);
      expect(res.headers.location).toBeUndefined();
    }
  });
});
