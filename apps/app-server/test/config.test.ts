import { isAbsolute, join, resolve } from 'node:path';
import { ConfigError, UNIX_SOCKET_PEER } from '@sfh/config';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.ts';

const SECRET = 'a-session-secret-of-at-least-32-chars';

/** Asserts that `env` is refused with a `ConfigError` naming `variable`. */
function expectRefused(env: Record<string, string>, variable: string) {
  let caught: unknown;
  try {
    loadConfig(env);
  } catch (error) {
    caught = error;
  }
  expect(caught).toBeInstanceOf(ConfigError);
  expect((caught as Error).message).toContain(variable);
}

describe('loadConfig', () => {
  it('applies the defaults', () => {
    const config = loadConfig({});
    expect(config.APP_PORT).toBe(3000);
    expect(config.TOKEN_TTL_SECONDS).toBe(60);
    expect(config.JWKS_REFRESH_SECONDS).toBe(60);
    expect(config.HOST).toBe('127.0.0.1');
    expect(config.APP_PUBLIC_URL).toBe('http://localhost:3000');
    expect(config.DOWNLOAD_PUBLIC_URL).toBe('http://localhost:3001');
    expect(config.trustProxy).toBe(false);
    expect(config.DATABASE_URL).toBeUndefined();
    expect(config.SESSION_SECRET).toBeUndefined();
    expect(config.storageDir).toBe(resolve('data', 'files'));
    expect(isAbsolute(config.storageDir)).toBe(true);
  });

  it('puts storage in DATA_DIR/files, as an absolute path', () => {
    expect(loadConfig({ DATA_DIR: '/srv/sfh' }).storageDir).toBe(join('/srv/sfh', 'files'));
    const relative = loadConfig({ DATA_DIR: 'some/dir' }).storageDir;
    expect(isAbsolute(relative)).toBe(true);
    expect(relative).toBe(resolve('some/dir/files'));
    expect(loadConfig({ DATA_DIR: '/srv/sfh', STORAGE_DIR: '/mnt/files' }).storageDir).toBe('/mnt/files');
  });

  it('coerces numbers and accepts the bounds of TOKEN_TTL_SECONDS', () => {
    expect(loadConfig({ TOKEN_TTL_SECONDS: '5' }).TOKEN_TTL_SECONDS).toBe(5);
    expect(loadConfig({ TOKEN_TTL_SECONDS: '600' }).TOKEN_TTL_SECONDS).toBe(600);
    expect(loadConfig({ APP_PORT: '0' }).APP_PORT).toBe(0);
    expect(loadConfig({ APP_PORT: '65535' }).APP_PORT).toBe(65535);
  });

  it.each(['4', '601', 'abc', '0', '-1', '60.5'])('refuses TOKEN_TTL_SECONDS=%s', (value) => {
    expectRefused({ TOKEN_TTL_SECONDS: value }, 'TOKEN_TTL_SECONDS');
  });

  it('has the share and argon2 limits documented in the README, with their bounds', () => {
    expect(loadConfig({})).toMatchObject({
      SHARE_MINT_RATE_PER_MINUTE: 60,
      SHARE_MINT_RATE_PER_OWNER_PER_MINUTE: 600,
      SHARE_DOWNLOADS_PER_IP_PER_MINUTE: 20,
      SHARE_PASSWORD_MAX_FAILURES_PER_IP: 5,
      SHARE_PASSWORD_MAX_FAILURES_PER_SHARE: 100,
      SHARE_CREATIONS_PER_USER_PER_HOUR: 60,
      SHARE_CREATIONS_PER_IP_PER_HOUR: 120,
      MAX_LIVE_SHARES_PER_USER: 500,
      MAX_LIVE_SHARES_PER_FILE: 50,
      ARGON2_CONCURRENCY: 1,
      ARGON2_QUEUE_MAX: 32,
    });
    expect(loadConfig({ SHARE_MINT_RATE_PER_MINUTE: '0', ARGON2_QUEUE_MAX: '0' })).toMatchObject({
      SHARE_MINT_RATE_PER_MINUTE: 0,
      ARGON2_QUEUE_MAX: 0,
    });
    for (const [name, value] of [
      ['ARGON2_CONCURRENCY', '0'],
      ['ARGON2_CONCURRENCY', '65'],
      ['ARGON2_QUEUE_MAX', '-1'],
      ['SHARE_DOWNLOADS_PER_IP_PER_MINUTE', '0'],
      ['SHARE_PASSWORD_MAX_FAILURES_PER_IP', '0'],
      ['SHARE_CREATIONS_PER_USER_PER_HOUR', '0'],
      ['MAX_LIVE_SHARES_PER_FILE', '0'],
      ['SHARE_MINT_RATE_PER_OWNER_PER_MINUTE', '-1'],
    ] as const)
      expectRefused({ [name]: value }, name);
  });

  it.each(['70000', '-1', 'http'])('refuses APP_PORT=%s', (value) => {
    expectRefused({ APP_PORT: value }, 'APP_PORT');
  });

  it('refuses a SESSION_SECRET shorter than 32 characters, also in a rotation list', () => {
    expectRefused({ SESSION_SECRET: 'x'.repeat(31) }, 'SESSION_SECRET');
    expectRefused({ SESSION_SECRET: `${SECRET},short` }, 'SESSION_SECRET');
    expect(loadConfig({ SESSION_SECRET: 'x'.repeat(32) }).SESSION_SECRET).toBe('x'.repeat(32));
    expect(loadConfig({ SESSION_SECRET: `${SECRET},${'y'.repeat(32)}` }).SESSION_SECRET).toBe(
      `${SECRET},${'y'.repeat(32)}`,
    );
  });

  it('requires SESSION_SECRET and KEY_ENCRYPTION_KEY in production', () => {
    const KEK = Buffer.alloc(32, 1).toString('base64url');
    expectRefused({ NODE_ENV: 'production', KEY_ENCRYPTION_KEY: KEK }, 'SESSION_SECRET');
    expectRefused({ NODE_ENV: 'production', SESSION_SECRET: '', KEY_ENCRYPTION_KEY: KEK }, 'SESSION_SECRET');
    expectRefused({ NODE_ENV: 'production', SESSION_SECRET: SECRET }, 'KEY_ENCRYPTION_KEY');
    expectRefused(
      { NODE_ENV: 'production', SESSION_SECRET: SECRET, KEY_ENCRYPTION_KEY: 'short' },
      'KEY_ENCRYPTION_KEY',
    );
    const config = loadConfig({ NODE_ENV: 'production', SESSION_SECRET: SECRET, KEY_ENCRYPTION_KEY: KEK });
    expect(config.kek).toEqual(Buffer.alloc(32, 1));
  });

  it('refuses a DATABASE_URL that is not Postgres', () => {
    expectRefused({ DATABASE_URL: 'mysql://x' }, 'DATABASE_URL');
    expect(loadConfig({ DATABASE_URL: 'postgres://u@h/db' }).DATABASE_URL).toBe('postgres://u@h/db');
    expect(loadConfig({ DATABASE_URL: 'postgresql://u@h/db' }).DATABASE_URL).toBe('postgresql://u@h/db');
  });

  it('unset public URLs follow the ports, so changing only a port keeps A and B pointing at each other', () => {
    const config = loadConfig({ APP_PORT: '4000', DOWNLOAD_PORT: '4001' });
    expect(config.APP_PUBLIC_URL).toBe('http://localhost:4000');
    expect(config.DOWNLOAD_PUBLIC_URL).toBe('http://localhost:4001');
    expect(loadConfig({ APP_PORT: '4000', APP_PUBLIC_URL: 'https://a.example' }).APP_PUBLIC_URL).toBe(
      'https://a.example',
    );
  });

  it('accepts public URLs with a path prefix (a server behind a proxy under a path)', () => {
    const config = loadConfig({
      APP_PUBLIC_URL: 'https://example.com/files',
      DOWNLOAD_PUBLIC_URL: 'https://cdn.example.com/dl/v1',
    });
    expect(config.APP_PUBLIC_URL).toBe('https://example.com/files');
    expect(config.DOWNLOAD_PUBLIC_URL).toBe('https://cdn.example.com/dl/v1');
  });

  it('refuses public URLs with a trailing slash, a query, a fragment or another scheme', () => {
    expectRefused({ DOWNLOAD_PUBLIC_URL: 'https://cdn.example.com/dl/' }, 'DOWNLOAD_PUBLIC_URL');
    expectRefused({ APP_PUBLIC_URL: 'https://example.com/files?x=1' }, 'APP_PUBLIC_URL');
    expectRefused({ APP_PUBLIC_URL: 'https://example.com/files#top' }, 'APP_PUBLIC_URL');
    expectRefused({ APP_PUBLIC_URL: 'https://example.com//files' }, 'APP_PUBLIC_URL');
  });

  it('refuses public URLs that are not bare origins', () => {
    expectRefused({ APP_PUBLIC_URL: 'http://a.test/' }, 'APP_PUBLIC_URL');
    expectRefused({ DOWNLOAD_PUBLIC_URL: 'ftp://b.test' }, 'DOWNLOAD_PUBLIC_URL');
  });

  it('TRUST_PROXY: false, proxy addresses or a hop count; never "true" (everyone)', () => {
    expectRefused({ TRUST_PROXY: 'true' }, 'TRUST_PROXY');
    expectRefused({ TRUST_PROXY: '10.0.0.1,not-an-address' }, 'TRUST_PROXY');
    expectRefused({ TRUST_PROXY: '10.0.0.0/33' }, 'TRUST_PROXY');
    expect(loadConfig({ TRUST_PROXY: 'false' }).trustProxy).toBe(false);
    expect(loadConfig({ TRUST_PROXY: '10.0.0.1, 192.168.0.0/16,::1,loopback' }).trustProxy).toEqual([
      '10.0.0.1',
      '192.168.0.0/16',
      '::1',
      'loopback',
    ]);
    const hops = loadConfig({ TRUST_PROXY: '2' }).trustProxy as (address: string, hop: number) => boolean;
    expect([hops('1.2.3.4', 0), hops('1.2.3.4', 1), hops('1.2.3.4', 2)]).toEqual([true, true, false]);
    // `unix`: the peers on APP_SOCKET_PATH, who all have an address no TCP peer can have.
    expect(loadConfig({ TRUST_PROXY: 'unix' }).trustProxy).toEqual([UNIX_SOCKET_PEER]);
  });

  it('APP_SOCKET_PATH: unset by default; an absolute path that fits a Unix socket', () => {
    expect(loadConfig({}).APP_SOCKET_PATH).toBeUndefined();
    expect(loadConfig({ APP_SOCKET_PATH: '/run/sfh-app/3000/app.sock' }).APP_SOCKET_PATH).toBe(
      '/run/sfh-app/3000/app.sock',
    );
    expectRefused({ APP_SOCKET_PATH: 'run/app.sock' }, 'APP_SOCKET_PATH');
    expectRefused({ APP_SOCKET_PATH: `/${'x'.repeat(100)}` }, 'APP_SOCKET_PATH');
  });
});
