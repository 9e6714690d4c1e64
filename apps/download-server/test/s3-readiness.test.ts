/**
 * B's /readyz with S3_BUCKET reads the bucket as B may (s3:GetObject only, no HeadBucket): ready
 * when the store answers and takes B's credentials; 503 naming `storage` when it is down, stalls,
 * refuses the credentials or has no such bucket. Against the real store (infra/s3-local.sh),
 * taken away for real by a TCP gate in front of it.
 */
import { beforeAll, describe, expect, it, onTestFinished, vi } from 'vitest';
import { freshPrefix, requireS3, S3_PORT, S3_SKIP, s3Env } from '../../../test/support/s3.ts';
import { startTcpGate } from '../../../test/support/tcp-gate.ts';
import { buildTestApp } from './helpers.ts';

/** B on the bucket through a gate, with the SDK's own AWS_* variables as in a deployment. */
async function bOnS3(who: 'reader' | 'writer', env: Record<string, string> = {}) {
  const gate = await startTcpGate(S3_PORT);
  onTestFinished(() => gate.close());
  const settings = {
    ...s3Env(freshPrefix(), who, `http://127.0.0.1:${gate.port}`),
    S3_TIMEOUT_MS: '500',
    ...env,
  };
  for (const name of ['AWS_ENDPOINT_URL_S3', 'AWS_REGION', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'])
    vi.stubEnv(name, settings[name as keyof typeof settings]);
  const { app } = await buildTestApp(settings);
  const readyz = async () => {
    const response = await app.inject({ method: 'GET', url: '/readyz' });
    return { status: response.statusCode, missing: response.json().missing as string[] };
  };
  return { gate, readyz };
}

describe.skipIf(S3_SKIP)('B /readyz with S3_BUCKET', () => {
  beforeAll(requireS3);

  it('read-only credentials: 200; the bucket down or stalled: 503 naming storage, quickly; back: 200', async () => {
    const { gate, readyz } = await bOnS3('reader');
    expect(await readyz()).toEqual({ status: 200, missing: [] });
    for (const mode of ['down', 'stall'] as const) {
      gate.set(mode);
      const started = performance.now();
      expect(await readyz()).toEqual({ status: 503, missing: ['storage'] });
      // S3_TIMEOUT_MS=500, two attempts.
      expect(performance.now() - started).toBeLessThan(3_000);
      gate.set('open');
      expect(await readyz()).toEqual({ status: 200, missing: [] });
    }
  });

  it('a wrong secret, an unknown access key: 503 naming storage', async () => {
    expect(await (await bOnS3('reader', { AWS_SECRET_ACCESS_KEY: 'wrong' })).readyz()).toEqual({
      status: 503,
      missing: ['storage'],
    });
    expect(await (await bOnS3('reader', { AWS_ACCESS_KEY_ID: 'sfh:nobody' })).readyz()).toEqual({
      status: 503,
      missing: ['storage'],
    });
  });

  it('no such bucket: 503 naming storage (the store says so to credentials that may look)', async () => {
    const { readyz } = await bOnS3('writer', { S3_BUCKET: 'no-such-bucket-here' });
    expect(await readyz()).toEqual({ status: 503, missing: ['storage'] });
  });
});
