/**
 * A's `GET /metrics` (README "Metrics"): each series moves with the thing it counts,
 * through real requests on a real database.
 */
import type { FastifyInstance } from 'fastify';
import { describe, expect, it } from 'vitest';
import { buildTestApp, TestClient, useTestDatabase } from './helpers.ts';
import { username } from './test-utils.ts';

const db = useTestDatabase();
const PASSWORD = 'correct horse battery';

/** The value of one series (exact name with labels) in A's metrics, or undefined. */
async function metric(app: FastifyInstance, series: string): Promise<number | undefined> {
  const res = await app.inject({ method: 'GET', url: '/metrics' });
  expect(res.statusCode).toBe(200);
  expect(String(res.headers['content-type'])).toMatch(/^text\/plain/);
  for (const line of res.body.split('\n')) {
    if (line.startsWith('#')) continue;
    const space = line.lastIndexOf(' ');
    if (line.slice(0, space) === series) return Number(line.slice(space + 1));
  }
  return undefined;
}

describe('A /metrics', () => {
  it('counts sign-ins by outcome, uploads and bytes, minted tokens, sessions, keys and the pool', async () => {
    const { app } = await buildTestApp(db());
    const name = username();
    const alice = new TestClient(app);
    await alice.register(name, PASSWORD);
    expect(await metric(app, 'sessions_active')).toBe(1);

    const stranger = new TestClient(app);
    expect((await stranger.login(name, 'wrong password!')).statusCode).toBe(401);
    expect((await stranger.login(name, PASSWORD)).statusCode).toBe(200);
    expect(await metric(app, 'sign_ins_total{outcome="invalid_credentials"}')).toBe(1);
    expect(await metric(app, 'sign_ins_total{outcome="ok"}')).toBe(1);
    expect(await metric(app, 'sessions_active')).toBe(2);

    const upload = await alice.upload('a.txt', 'twelve bytes');
    expect(upload.statusCode).toBe(201);
    expect(await metric(app, 'uploads_total')).toBe(1);
    expect(await metric(app, 'upload_bytes_received_total')).toBe(12);

    const id = upload.json().file.id;
    for (let i = 0; i < 2; i++)
      expect(
        (await alice.request({ method: 'POST', url: `/api/files/${id}/download-token` })).statusCode,
      ).toBe(201);
    expect(await metric(app, 'tokens_minted_total{kind="session"}')).toBe(2);

    expect(await metric(app, 'signing_keys{state="current"}')).toBe(1);
    expect(await metric(app, 'signing_keys{state="next"}')).toBe(0);
    expect(await metric(app, 'signing_key_switches_total')).toBe(1);
    expect(await metric(app, 'database_pool_connections{state="total"}')).toBeGreaterThan(0);
    expect(await metric(app, 'database_errors_total{kind="unavailable"}')).toBeUndefined();
    expect(await metric(app, 'process_resident_memory_bytes')).toBeGreaterThan(0);
    expect(await metric(app, 'nodejs_eventloop_lag_seconds')).toBeGreaterThanOrEqual(0);
  });

  it('counts throttled sign-ins and mints', async () => {
    const { app } = await buildTestApp(db(), {
      LOGIN_MAX_FAILURES_PER_ACCOUNT: '1',
      MINT_RATE_PER_MINUTE: '1',
    });
    const name = username();
    const alice = new TestClient(app);
    await alice.register(name, PASSWORD);
    const id = (await alice.upload('a.txt', 'x')).json().file.id;
    const mint = () => alice.request({ method: 'POST', url: `/api/files/${id}/download-token` });
    expect((await mint()).statusCode).toBe(201);
    expect((await mint()).statusCode).toBe(429);
    expect(await metric(app, 'throttled_requests_total{limit="mint"}')).toBe(1);

    const guesser = new TestClient(app);
    expect((await guesser.login(name, 'wrong password!')).statusCode).toBe(401);
    expect((await guesser.login(name, 'wrong password!')).statusCode).toBe(429);
    expect(await metric(app, 'throttled_requests_total{limit="sign_in"}')).toBe(1);
    expect(await metric(app, 'sign_ins_total{outcome="throttled"}')).toBe(1);
  });
});
