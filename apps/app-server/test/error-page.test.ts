import { expect, it } from 'vitest';
import { createTestDatabase } from '../../../test/support/database.ts';
import { buildTestApp, TestClient } from './helpers.ts';

const BROWSER = 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8';

// The page A shows when it cannot answer a navigation (here: its database went away) links
// back to A's own paths only. `//evil.example/...` is a path to A's router, but a link to another
// host in a browser.
it('the error page links to A itself, never to a host named in the request path', async () => {
  const db = await createTestDatabase();
  const { app } = await buildTestApp(db);
  const client = new TestClient(app);
  await client.register();
  await db.close(); // the database is gone

  // Paths A does not route are a plain 404 that needs no database (and has no link).
  for (const url of ['//evil.example/steal', '/\\evil.example/steal']) {
    const response = await client.request({ method: 'GET', url, headers: { accept: BROWSER } });
    expect(response.statusCode).toBe(404);
    expect(response.body).not.toContain('evil.example"');
  }
  for (const url of ['/?x=//evil.example/steal', '/sessions?next=//evil.example']) {
    const response = await client.request({ method: 'GET', url, headers: { accept: BROWSER } });
    expect(response.statusCode).toBeGreaterThanOrEqual(500);
    expect(response.headers['content-type']).toMatch(/^text\/html/);
    const href = /<a href="([^"]*)"/.exec(response.body)?.[1];
    expect(href).toBeDefined();
    expect(new URL(href as string, 'http://a.test').origin, `link ${href} for ${url}`).toBe('http://a.test');
  }
});
