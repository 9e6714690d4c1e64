/**
 * Single use until the last instant a token is accepted: the replay record and the verifier's
 * acceptance come from one function (src/single-use/policy.ts), for the memory store and for a real
 * Redis (a throwaway redis-server of this test). Time is fixed with `vi.setSystemTime`.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { freePort } from '../../../../test/support/processes.ts';
import { startRedis } from '../../../../test/support/redis.ts';
import { buildTestApp } from '../helpers.ts';

afterEach(() => {
  vi.useRealTimers();
});

const stores = {
  memory: async () => ({}),
  redis: async () => {
    const port = await freePort();
    await startRedis(port, ['--maxmemory-policy', 'noeviction']);
    return { REDIS_URL: `redis://127.0.0.1:${port}` };
  },
};

describe.each(Object.keys(stores) as (keyof typeof stores)[])(
  'a token whose age limit ends before its exp (%s store)',
  (store) => {
    it('is single use in the last second it is accepted, and refused right after', async () => {
      const env = await stores[store]();
      // TOKEN_TTL_SECONDS above TOKEN_MAX_AGE_SECONDS: the age limit ends the token's life.
      const b = await buildTestApp({ ...env, TOKEN_MAX_AGE_SECONDS: '5', CLOCK_TOLERANCE_SECONDS: '0' });
      const file = await b.putFile('the last second');
      const iat = Math.floor(Date.now() / 1000);
      const token = await b.mint(file, { now: new Date(iat * 1000), ttlSeconds: 600 });
      const get = () =>
        b.app.inject({ method: 'GET', url: `/d/${token}`, headers: { accept: 'application/json' } });

      vi.useFakeTimers({ toFake: ['Date'] });
      // 5.9 s after iat: still accepted (the verifier compares whole seconds).
      vi.setSystemTime(iat * 1000 + 5_900);
      expect((await get()).statusCode).toBe(200);
      const again = await get();
      expect({ status: again.statusCode, error: again.json().error }).toEqual({
        status: 410,
        error: 'TOKEN_USED',
      });
      // And refused as too old from the next second on.
      vi.setSystemTime(iat * 1000 + 6_000);
      const late = await get();
      expect({ status: late.statusCode, error: late.json().error }).toEqual({
        status: 403,
        error: 'TOKEN_EXPIRED',
      });
    });
  },
);
