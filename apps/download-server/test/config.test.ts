import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.ts';

describe("B's loadConfig", () => {
  it('unset public URLs follow the ports, and so does the default JWKS_URL', () => {
    const config = loadConfig({ APP_PORT: '4000', DOWNLOAD_PORT: '4001' });
    expect(config.APP_PUBLIC_URL).toBe('http://localhost:4000');
    expect(config.DOWNLOAD_PUBLIC_URL).toBe('http://localhost:4001');
    expect(config.jwksSource).toEqual({ url: 'http://localhost:4000/.well-known/jwks.json' });
  });

  it('RESEND_MARGIN_BYTES defaults to 16 MiB and is refused, by name, outside 64 KiB..1 GiB', () => {
    expect(loadConfig({}).RESEND_MARGIN_BYTES).toBe(16_777_216);
    expect(loadConfig({ RESEND_MARGIN_BYTES: '65536' }).RESEND_MARGIN_BYTES).toBe(65_536);
    for (const bad of ['0', '1000', '-1', '2000000000', 'lots', '1.5'])
      expect(() => loadConfig({ RESEND_MARGIN_BYTES: bad }), bad).toThrow(/RESEND_MARGIN_BYTES/);
  });
});
