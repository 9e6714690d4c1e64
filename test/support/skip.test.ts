import { describe, expect, it, vi } from 'vitest';
import { skipUnless } from './skip.ts';

describe('skipUnless: a suite that cannot run here says why', () => {
  it('skips with the reason on stderr and in the name when something is missing', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    expect(skipUnless('scale-out', 'needs Postgres: set TEST_DATABASE_URL', false)).toEqual({
      skip: true,
      reason: ' (skipped: needs Postgres: set TEST_DATABASE_URL)',
    });
    expect(warn).toHaveBeenCalledWith('skipped: scale-out: needs Postgres: set TEST_DATABASE_URL');
    warn.mockRestore();
  });

  it('runs when nothing is missing, and when it is required (CI): then the suite fails instead', () => {
    expect(skipUnless('scale-out', undefined, false)).toEqual({ skip: false, reason: '' });
    expect(skipUnless('scale-out', false, false)).toEqual({ skip: false, reason: '' });
    expect(skipUnless('scale-out', 'needs Postgres', true)).toEqual({ skip: false, reason: '' });
  });
});
