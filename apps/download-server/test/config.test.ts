import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.ts';

describe("B's loadConfig", () => {
  it('unset public URLs follow the ports, and so does the default JWKS_URL', () => {
    const config = loadConfig({ APP_PORT: '4000', DOWNLOAD_PORT: '4001' });
    expect(config.APP_PUBLIC_URL).toBe('http://localhost:4000');
    expect(config.DOWNLOAD_PUBLIC_URL).toBe('http://localhost:4001');
    expect(config.jwksSource).toEqual({ url: 'http://localhost:4000/.well-known/jwks.json' });
  });
});
