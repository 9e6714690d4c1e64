/**
 * Sign-in and token minting latency of one user while another floods A with password-share
 * creations (each an argon2id hash at the default cost): what the argon2 queue and the share
 * creation limits bound. A runs as a real process on a fresh Postgres database.
 *
 *   npx tsx test/bench/argon2-flood.ts [--app=path/to/server.ts] [NAME=value ...]
 *
 * NAME=value pairs go to A's environment (SHARE_CREATIONS_PER_USER_PER_HOUR=100000 measures the
 * queue alone); `--app` runs another checkout's A (the code before a change); `--no-password`
 * floods with shares without a password: the same requests without the argon2 work, the control.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { APP_SERVER, freePort, startServer } from '../support/processes.ts';
import { percentile } from './lib.ts';

const FLOODERS = 32;
const SAMPLES = 15;
const ADMIN_URL = process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';

const args = process.argv.slice(2);
const app = args.find((arg) => arg.startsWith('--app='))?.slice('--app='.length) ?? APP_SERVER;
const withPassword = !args.includes('--no-password');
const extraEnv = Object.fromEntries(
  args.filter((arg) => !arg.startsWith('--')).map((arg) => arg.split(/=(.*)/s, 2) as [string, string]),
);

/** A browser-like client: a cookie jar, the CSRF token, A's Origin on every post. */
class Client {
  cookies = new Map<string, string>();
  csrf = '';
  constructor(readonly base: string) {}

  async request(method: string, path: string, body?: unknown): Promise<Response> {
    const headers: Record<string, string> = { origin: this.base };
    if (this.cookies.size) headers.cookie = [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
    if (method !== 'GET') headers['x-csrf-token'] = this.csrf;
    let payload: FormData | string | undefined;
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      headers['content-type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    const response = await fetch(`${this.base}${path}`, {
      method,
      headers,
      body: payload,
      redirect: 'manual',
    });
    for (const line of response.headers.getSetCookie()) {
      const [pair = ''] = line.split(';');
      const at = pair.indexOf('=');
      this.cookies.set(pair.slice(0, at), pair.slice(at + 1));
    }
    return response;
  }

  async refreshCsrf(): Promise<void> {
    this.csrf = ((await (await this.request('GET', '/api/csrf')).json()) as { token: string }).token;
  }

  async signUp(username: string): Promise<void> {
    await this.refreshCsrf();
    const response = await this.request('POST', '/api/auth/register', {
      username,
      password: 'correct horse battery',
    });
    if (response.status !== 201) throw new Error(`register: ${response.status} ${await response.text()}`);
    await this.refreshCsrf();
  }

  async upload(name: string): Promise<string> {
    const form = new FormData();
    form.append('file', new Blob(['some bytes']), name);
    const response = await this.request('POST', '/api/files', form);
    if (response.status !== 201) throw new Error(`upload: ${response.status} ${await response.text()}`);
    return ((await response.json()) as { file: { id: string } }).file.id;
  }
}

const ms = (start: number) => performance.now() - start;
const summary = (samples: number[]) =>
  `median ${percentile(samples, 50).toFixed(0)} ms, p95 ${percentile(samples, 95).toFixed(0)} ms, max ${Math.max(...samples).toFixed(0)} ms`;

/** Sequential sign-ins (a new session each) and token mints of `victim`. */
async function measure(base: string, username: string, fileId: string, victim: Client) {
  const signIns: number[] = [];
  const mints: number[] = [];
  const statuses: number[] = [];
  for (let i = 0; i < SAMPLES; i++) {
    const browser = new Client(base);
    await browser.refreshCsrf();
    let start = performance.now();
    const login = await browser.request('POST', '/api/auth/login', {
      username,
      password: 'correct horse battery',
    });
    signIns.push(ms(start));
    statuses.push(login.status);
    await login.arrayBuffer();
    start = performance.now();
    const mint = await victim.request('POST', `/api/files/${fileId}/download-token`);
    mints.push(ms(start));
    statuses.push(mint.status);
    await mint.arrayBuffer();
  }
  return { signIns, mints, statuses };
}

const admin = new pg.Client({ connectionString: ADMIN_URL });
await admin.connect();
const database = `argon2_flood_${process.pid}`;
await admin.query(`CREATE DATABASE ${database}`);
const dataDir = await mkdtemp(join(tmpdir(), 'sfh-flood-'));
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const server = await startServer(
  app,
  {
    DATABASE_URL: ADMIN_URL.replace(/\/[^/]*$/, `/${database}`),
    DATA_DIR: dataDir,
    APP_PORT: String(port),
    HOST: '127.0.0.1',
    APP_PUBLIC_URL: base,
    DOWNLOAD_PUBLIC_URL: 'http://127.0.0.1:9',
    ...extraEnv,
  },
  `${base}/healthz`,
);
try {
  const victim = new Client(base);
  await victim.signUp('victim');
  const victimFile = await victim.upload('mine.txt');
  const flooder = new Client(base);
  await flooder.signUp('flooder');
  const bait = await flooder.upload('bait.txt');

  const idle = await measure(base, 'victim', victimFile, victim);

  const flood = new Map<number, number>();
  let stop = false;
  const workers = Array.from({ length: FLOODERS }, async () => {
    while (!stop) {
      const response = await flooder.request(
        'POST',
        `/api/files/${bait}/shares`,
        withPassword ? { password: 'open sesame!' } : {},
      );
      flood.set(response.status, (flood.get(response.status) ?? 0) + 1);
      await response.arrayBuffer();
    }
  });
  const started = performance.now();
  await new Promise((resolve) => setTimeout(resolve, 300));
  const loaded = await measure(base, 'victim', victimFile, victim);
  stop = true;
  await Promise.all(workers);
  const seconds = ms(started) / 1000;
  const created = flood.get(201) ?? 0;

  console.log(
    `A: ${app} ${Object.entries(extraEnv)
      .map(([k, v]) => `${k}=${v}`)
      .join(' ')}`,
  );
  console.log(`idle       sign-in ${summary(idle.signIns)}; mint ${summary(idle.mints)}`);
  console.log(`flooded    sign-in ${summary(loaded.signIns)}; mint ${summary(loaded.mints)}`);
  const victimStatuses = [...new Set(loaded.statuses)].sort().join(', ');
  console.log(`victim statuses under the flood: ${victimStatuses}`);
  console.log(
    `flood: ${FLOODERS} concurrent ${withPassword ? 'password-' : 'passwordless '}share creations for ${seconds.toFixed(1)} s: ` +
      [...flood].map(([status, n]) => `${n}× ${status}`).join(', ') +
      ` (${created} shares)`,
  );
} finally {
  await server.stop();
  await admin.query(`DROP DATABASE ${database} WITH (FORCE)`);
  await admin.end();
  await rm(dataDir, { recursive: true, force: true });
}
