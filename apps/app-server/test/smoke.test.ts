import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';

const db = useTestDatabase();

describe('smoke', () => {
  it('registers, uploads and mints', async () => {
    const { app } = await buildTestApp(db());
    const client = new TestClient(app);
    await client.register();
    const upload = await client.upload('hello.txt', 'hello', 'text/plain');
    expect(upload.statusCode).toBe(201);
    const { file } = upload.json();
    const mint = await client.request({ method: 'POST', url: `/api/files/${file.id}/download-token` });
    expect(mint.statusCode).toBe(201);
    expect(mint.json().url).toMatch(/^http:\/\/b\.test\/d\//);
  });
});
