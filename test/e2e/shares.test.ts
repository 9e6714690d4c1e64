/**
 * Share links with A and B as real processes: a recipient with no account and no cookies
 * downloads through B; a revoked share is refused at once while a token minted before keeps
 * working until it expires; an expired share; the password path and its throttle; a link scanner (GET with and without following redirects) counts
 * nothing; B sends a browser with a spent share token back to the share page.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SignedInClient } from '../support/http-client.ts';
import { type Stack, startStack } from '../support/stack.ts';

const BROWSER = 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8';

interface Share {
  id: string;
  url: string;
  downloads: number;
}

describe('share links across A and B', () => {
  let stack: Stack;
  let owner: SignedInClient;
  let fileId: string;
  const bytes = randomBytes(200_000);

  beforeAll(async () => {
    stack = await startStack();
    owner = await SignedInClient.signUp(stack.appOrigin, 'sharer', 'correct horse battery');
    const form = new FormData();
    form.append('file', new Blob([bytes], { type: 'application/pdf' }), 'plan.pdf');
    const upload = await owner.json<{ file: { id: string } }>('/api/files', { method: 'POST', body: form });
    expect(upload.status).toBe(201);
    fileId = upload.body.file.id;
  }, 120_000);

  afterAll(() => stack?.stop());

  async function share(body: Record<string, unknown> = {}): Promise<Share> {
    const response = await owner.json<{ share: Share }>(`/api/files/${fileId}/shares`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    expect(response.status).toBe(201);
    return response.body.share;
  }

  const downloads = async (id: string) =>
    (await owner.json<{ shares: Share[] }>('/api/shares')).body.shares.find((s) => s.id === id)?.downloads;

  it('a client with no cookies downloads through the share page form and B; B renews at the share page', async () => {
    const created = await share({ maxDownloads: 2 });
    expect(created.url).toBe(`${stack.appOrigin}/s/${created.id}`);
    // The page, as a browser without any cookie sees it.
    const page = await fetch(created.url, { headers: { accept: BROWSER } });
    expect(page.status).toBe(200);
    expect(page.headers.get('set-cookie')).toBeNull();
    expect(await page.text()).toContain('plan.pdf');

    const post = await fetch(`${created.url}/download`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', origin: stack.appOrigin },
      body: '',
      redirect: 'manual',
    });
    expect(post.status).toBe(303);
    expect(post.headers.get('set-cookie')).toBeNull();
    const location = post.headers.get('location') as string;
    expect(location.startsWith(`${stack.downloadOrigin}/d/`)).toBe(true);
    const file = await fetch(location);
    expect(file.status).toBe(200);
    expect(Buffer.from(await file.arrayBuffer()).equals(bytes)).toBe(true);

    // The spent token, followed again by a browser: back to the share page, not to A's sign-in.
    const again = await fetch(location, { headers: { accept: BROWSER }, redirect: 'manual' });
    expect(again.status).toBe(303);
    expect(again.headers.get('location')).toBe(created.url);
    expect(await downloads(created.id)).toBe(1);
  });

  it('a revoked share mints nothing at once; a token minted before still downloads', async () => {
    const created = await share();
    const minted = await fetch(`${stack.appOrigin}/api/shares/${created.id}/download-token`, {
      method: 'POST',
    });
    expect(minted.status).toBe(201);
    const { url } = (await minted.json()) as { url: string };

    expect((await owner.fetch(`/api/shares/${created.id}`, { method: 'DELETE' })).status).toBe(204);
    const refused = await fetch(`${stack.appOrigin}/api/shares/${created.id}/download-token`, {
      method: 'POST',
    });
    expect(refused.status).toBe(404);
    expect(((await refused.json()) as { error: string }).error).toBe('NOT_FOUND');
    expect((await fetch(created.url)).status).toBe(404);

    const file = await fetch(url);
    expect(file.status).toBe(200);
    expect(Buffer.from(await file.arrayBuffer()).equals(bytes)).toBe(true);
  });

  it('the password path: right downloads, wrong is 401, and after 5 wrong ones 429 with Retry-After', async () => {
    const created = await share({ password: 'open sesame!' });
    const token = (password: string) =>
      fetch(`${stack.appOrigin}/api/shares/${created.id}/download-token`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ password }),
      });
    const right = await token('open sesame!');
    expect(right.status).toBe(201);
    const file = await fetch(((await right.json()) as { url: string }).url);
    expect(Buffer.from(await file.arrayBuffer()).equals(bytes)).toBe(true);
    // SHARE_PASSWORD_MAX_FAILURES_PER_IP (5): for this share, from this address.
    for (let i = 0; i < 5; i++) {
      const wrong = await token('open sesame?');
      expect(wrong.status).toBe(401);
      expect(((await wrong.json()) as { error: string }).error).toBe('INVALID_CREDENTIALS');
    }
    const limited = await token('open sesame!');
    expect(limited.status).toBe(429);
    expect(Number(limited.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(await downloads(created.id)).toBe(1);
  });

  it("a link scanner's GET, with and without following redirects, counts nothing", async () => {
    const created = await share({ maxDownloads: 1 });
    for (const redirect of ['follow', 'manual'] as const) {
      for (const url of [created.url, `${created.url}/download`]) {
        const response = await fetch(url, { redirect, headers: { accept: BROWSER } });
        expect(response.status).toBeLessThan(500);
        await response.arrayBuffer();
      }
      const head = await fetch(created.url, { method: 'HEAD', redirect });
      expect(head.status).toBe(200);
    }
    expect(await downloads(created.id)).toBe(0);
    // The one download is still there for the recipient.
    const minted = await fetch(`${stack.appOrigin}/api/shares/${created.id}/download-token`, {
      method: 'POST',
    });
    expect(minted.status).toBe(201);
    expect(await downloads(created.id)).toBe(1);
  });

  it('an expired share: the page says so (410) and mints nothing, as A and B run', async () => {
    const created = await share({ expiresInSeconds: 60, maxDownloads: 5 });
    expect((await fetch(created.url)).status).toBe(200);
    // The shortest a share can live is a minute: wait it out on the real clock.
    await new Promise((resolve) => setTimeout(resolve, 61_000));
    const page = await fetch(created.url, { headers: { accept: BROWSER } });
    expect(page.status).toBe(410);
    expect(await page.text()).not.toContain('/download"');
    const minted = await fetch(`${stack.appOrigin}/api/shares/${created.id}/download-token`, {
      method: 'POST',
    });
    expect(minted.status).toBe(410);
    expect(((await minted.json()) as { error: string }).error).toBe('SHARE_EXPIRED');
    const form = await fetch(`${created.url}/download`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', origin: stack.appOrigin },
      body: '',
      redirect: 'manual',
    });
    expect(form.status).toBe(410);
    expect(await downloads(created.id)).toBe(0);
  }, 90_000);
});
