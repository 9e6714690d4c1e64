/**
 * infra/: what can be checked on a development or CI machine without Docker or systemd running.
 * - nginx: `nginx -t` on the local cluster's rendered config, on the production examples (in a
 *   minimal `events {} http { include ...; }` wrapper, certificates replaced by a throwaway
 *   self-signed pair) and on the compose file's config (service names pointed at 127.0.0.1).
 * - compose.yaml parses, everything it refers to exists, every variable it sets is one the
 *   server it configures reads.
 * - Dockerfiles and systemd units carry what an operator relies on; `systemd-analyze verify`.
 * - `infra/local-cluster.sh`: `bash -n`, and one real run (up, readyz through both nginx
 *   origins, down, nothing left running) on the local Postgres (a fresh schema) and Redis.
 *
 * nginx is Debian's (`apt-get install -y nginx`); CI installs it, a developer machine without it
 * skips those checks. CI without nginx fails them.
 */
import { execFile, spawn, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { createServer, get as httpGet } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AWS_SDK_ENV } from '@sfh/config';
import { decodeJwt } from 'jose';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { parse } from 'yaml';
import { AppEnv } from '../apps/app-server/src/config.ts';
import { DownloadEnv } from '../apps/download-server/src/config.ts';
import { createTestDatabase, type TestDatabase } from './support/database.ts';
import { CookieJar } from './support/http-client.ts';
import { NGINX_BINARY } from './support/nginx.ts';
import { APP_SERVER, DOWNLOAD_SERVER, freePort, startServer } from './support/processes.ts';
import { skipUnless } from './support/skip.ts';
import { CHEAP_PASSWORDS } from './support/stack.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const INFRA = join(ROOT, 'infra');
const CLUSTER_SCRIPT = join(INFRA, 'local-cluster.sh');

const nginxAvailable = NGINX_BINARY !== undefined;
const systemdAnalyze = spawnSync('systemd-analyze', ['--version']).status === 0;
const nginx = skipUnless(
  'the nginx checks of test/infra.test.ts',
  !nginxAvailable && 'no nginx (apt-get install -y nginx)',
);
// Not in CI's image either: this check runs where systemd is.
const systemd = skipUnless(
  'systemd-analyze verify',
  !systemdAnalyze && 'no systemd-analyze (a machine with systemd)',
  false,
);
const postgres = skipUnless(
  'infra/local-cluster.sh up and down',
  !process.env.TEST_DATABASE_URL && 'needs Postgres: set TEST_DATABASE_URL (and Redis on 127.0.0.1:6379)',
);

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end (never throws on a non-zero exit). */
function run(
  command: string,
  args: string[],
  options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      command,
      args,
      { cwd: ROOT, env: options.env ?? process.env, timeout: options.timeoutMs ?? 60_000 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : null) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

function requireNginx(): string {
  if (!NGINX_BINARY) {
    throw new Error('nginx is not installed: CI must install it (apt-get install -y nginx in .ci/run)');
  }
  return NGINX_BINARY;
}

/** `nginx -t` on a main config, with its prefix, error log and temp paths in `dir`. */
async function nginxTest(dir: string, conf: string): Promise<Run> {
  const result = await run(requireNginx(), ['-t', '-p', `${dir}/`, '-e', join(dir, 'error.log'), '-c', conf]);
  return { ...result, stderr: result.stderr.trim() };
}

/** A main config around `includes`, as Debian's nginx.conf includes conf.d/*.conf in `http`. */
async function wrapper(dir: string, includes: string[]): Promise<string> {
  await mkdir(join(dir, 'tmp'), { recursive: true });
  const conf = join(dir, 'wrapper.conf');
  const temp = ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']
    .map((name) => `  ${name}_temp_path ${dir}/tmp/${name};`)
    .join('\n');
  await writeFile(
    conf,
    `pid ${dir}/nginx.pid;
error_log ${dir}/error.log;
events {}
http {
${temp}
  access_log ${dir}/access.log;
${includes.map((file) => `  include ${file};`).join('\n')}
}
`,
  );
  return conf;
}

/**
 * Besides the variables our config reads, an example may set the AWS SDK's own (region,
 * endpoint, the default credential chain); any other name is a typo.
 */
const AWS_SDK_SETTINGS = new Set<string>(AWS_SDK_ENV);
/** A variable an example may set for a server whose config reads `ours`. */
const settable = (ours: Set<string>, name: string) => ours.has(name) || AWS_SDK_SETTINGS.has(name);
/** What every example shows for the bytes in a bucket, for A and for B. */
const S3_SETTINGS = [
  'S3_BUCKET',
  'S3_PREFIX',
  'S3_FORCE_PATH_STYLE',
  'AWS_REGION',
  'AWS_ENDPOINT_URL_S3',
  'AWS_ACCESS_KEY_ID',
  'AWS_SECRET_ACCESS_KEY',
];

/** Properties of a `[section]`-style unit file: key → values (a key may repeat). */
function unitKeys(text: string): Map<string, string[]> {
  const keys = new Map<string, string[]>();
  for (const line of text.split('\n')) {
    const match = /^([A-Za-z]+)=(.*)$/.exec(line.trim());
    if (!match) continue;
    const [, key, value] = match as unknown as [string, string, string];
    keys.set(key, [...(keys.get(key) ?? []), value]);
  }
  return keys;
}

describe('infra/ files', () => {
  let temp: string;

  beforeAll(async () => {
    temp = await mkdtemp(join(tmpdir(), 'sfh-infra-'));
  });
  afterAll(async () => {
    await rm(temp, { recursive: true, force: true });
  });

  it('local-cluster.sh is valid bash, strict, and answers a wrong command with usage (exit 2)', async () => {
    expect(await run('bash', ['-n', CLUSTER_SCRIPT])).toMatchObject({ code: 0, stderr: '' });
    const text = await readFile(CLUSTER_SCRIPT, 'utf8');
    expect(text).toMatch(/^#!\/usr\/bin\/env bash\n/);
    expect(text).toContain('set -euo pipefail');
    const usage = await run('bash', [CLUSTER_SCRIPT, 'sideways'], {
      env: { ...process.env, CLUSTER_DIR: join(temp, 'usage') },
    });
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain('usage: infra/local-cluster.sh up|down|status');
  });

  it.skipIf(nginx.skip)(
    `nginx -t accepts the local cluster config the script renders${nginx.reason}`,
    async () => {
      const dir = join(temp, 'cluster');
      const rendered = await run('bash', [CLUSTER_SCRIPT, 'render'], {
        env: {
          ...process.env,
          CLUSTER_DIR: dir,
          A_PORTS: '4100,4101,4102',
          B_PORTS: '4200 4201',
          A_LB_PORT: '4180',
          B_LB_PORT: '4181',
        },
      });
      expect(rendered.code, rendered.stderr).toBe(0);
      const conf = rendered.stdout.trim();
      expect(conf).toBe(join(dir, 'nginx', 'nginx.conf'));
      const text = await readFile(conf, 'utf8');
      expect(text).not.toMatch(/@[A-Z_0-9]+@/);
      for (const port of [4100, 4101, 4102, 4200, 4201]) expect(text).toContain(`server 127.0.0.1:${port} `);
      expect(text).toContain('listen 127.0.0.1:4180;');
      expect(text).toContain('listen 127.0.0.1:4181;');
      // Everything nginx writes stays inside CLUSTER_DIR.
      const directives = text.replace(/#.*$/gm, '');
      expect(directives).not.toMatch(/\/var\/|\/etc\/nginx|\/run\//);
      const result = await nginxTest(join(dir, 'nginx'), conf);
      expect(result.code, result.stderr).toBe(0);
      expect(result.stderr).toContain('test is successful');
    },
  );

  it.skipIf(nginx.skip)(
    `nginx -t accepts the production examples for A and B together${nginx.reason}`,
    async () => {
      const dir = join(temp, 'production');
      await mkdir(dir, { recursive: true });
      // A throwaway certificate instead of the example paths, and logs in the temp folder.
      const cert = await run('openssl', [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:prime256v1',
        '-nodes',
        '-subj',
        '/CN=example.com',
        '-days',
        '1',
        '-keyout',
        join(dir, 'key.pem'),
        '-out',
        join(dir, 'cert.pem'),
      ]);
      expect(cert.code, `openssl is needed for a test certificate: ${cert.stderr}`).toBe(0);
      const includes: string[] = [];
      for (const name of ['app.conf', 'download.conf']) {
        const original = await readFile(join(INFRA, 'nginx', name), 'utf8');
        expect(original).toMatch(/proxy_set_header X-Forwarded-Proto \$scheme;/);
        expect(original).toMatch(/ssl_certificate /);
        const copy = join(dir, name);
        await writeFile(
          copy,
          original
            .replace(/ssl_certificate_key [^;]+;/g, `ssl_certificate_key ${dir}/key.pem;`)
            .replace(/ssl_certificate [^;]+;/g, `ssl_certificate ${dir}/cert.pem;`)
            .replaceAll('/var/log/nginx/', `${dir}/`),
        );
        includes.push(copy);
      }
      const result = await nginxTest(dir, await wrapper(dir, includes));
      expect(result.code, result.stderr).toBe(0);
    },
  );

  it('s3-local.sh is valid bash, strict, answers a wrong command with usage, and prints what A and B read', async () => {
    const script = join(INFRA, 's3-local.sh');
    expect(await run('bash', ['-n', script])).toMatchObject({ code: 0, stderr: '' });
    const text = await readFile(script, 'utf8');
    expect(text).toMatch(/^#!\/usr\/bin\/env bash\n/);
    expect(text).toContain('set -euo pipefail');
    const usage = await run('bash', [script, 'sideways']);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain('usage: infra/s3-local.sh start|stop|status|env');
    const env = await run('bash', [script, 'env'], { env: { ...process.env, S3_LOCAL_PORT: '9999' } });
    const settings = Object.fromEntries(
      env.stdout
        .trim()
        .split('\n')
        .map((line) => line.split('=', 2)),
    );
    for (const key of ['S3_BUCKET', 'S3_FORCE_PATH_STYLE']) {
      expect(Object.keys(AppEnv.properties)).toContain(key);
      expect(Object.keys(DownloadEnv.properties)).toContain(key);
      expect(settings[key]).toBeTruthy();
    }
    expect(settings.AWS_ENDPOINT_URL_S3).toBe('http://127.0.0.1:9999');
    // A's key can write, B's only read: two users, never the same.
    expect(settings.AWS_ACCESS_KEY_ID).toMatch(/^\w+:\w+$/);
    expect(settings.S3_READ_ACCESS_KEY_ID).not.toBe(settings.AWS_ACCESS_KEY_ID);
    // `npm start` hands B these as its AWS_* (infra/start.ts): B's own, read-only user.
    expect(settings.DOWNLOAD_AWS_ACCESS_KEY_ID).toBe(settings.S3_READ_ACCESS_KEY_ID);
    expect(settings.DOWNLOAD_AWS_SECRET_ACCESS_KEY).toBe(settings.S3_READ_SECRET_ACCESS_KEY);
  });

  it('the production nginx for B streams, waits long and never logs a token; A takes large uploads', async () => {
    const download = await readFile(join(INFRA, 'nginx', 'download.conf'), 'utf8');
    expect(download).toMatch(/proxy_buffering off;/);
    expect(download).toMatch(/proxy_read_timeout (\d+h|[0-9]{4,}s?);/);
    // Every access log of B is off or uses the redacted format (a format-less one logs $request).
    const accessLogs = [...download.matchAll(/access_log\s+([^;\s]+)(?:\s+([^;\s]+))?[^;]*;/g)];
    expect(accessLogs.length).toBeGreaterThan(0);
    for (const [line, path, format] of accessLogs) {
      expect(path === 'off' || format === 'sfh_download', line).toBe(true);
    }
    const formats = [...download.matchAll(/log_format\s+\S+([^;]+);/g)].map((m) => m[1] ?? '');
    for (const format of formats)
      expect(format).not.toMatch(/\$request\b|\$request_uri|\$args|\$query_string/);
    const app = await readFile(join(INFRA, 'nginx', 'app.conf'), 'utf8');
    expect(app).toMatch(/client_max_body_size \d+[mg];/);
    // The internal endpoints stay off the public side (the compose file's nginx runs for real below).
    for (const conf of [download, app]) {
      expect(conf).toMatch(/location = \/metrics \{ return 404; \}/);
      expect(conf).toMatch(/location = \/readyz \{ return 404; \}/);
    }
  });

  it.skipIf(nginx.skip)(`nginx -t accepts the compose file's nginx config${nginx.reason}`, async () => {
    const dir = join(temp, 'compose-nginx');
    await mkdir(dir, { recursive: true });
    const original = await readFile(join(INFRA, 'docker', 'nginx.conf'), 'utf8');
    // Compose's service names do not resolve here: point the upstreams at this host.
    const copy = join(dir, 'default.conf');
    await writeFile(
      copy,
      original
        .replace(/server [a-z0-9-]+:(\d+)/g, 'server 127.0.0.1:$1')
        .replaceAll('/var/log/nginx/', `${dir}/`),
    );
    const result = await nginxTest(dir, await wrapper(dir, [copy]));
    expect(result.code, result.stderr).toBe(0);
  });

  it.skipIf(nginx.skip)(
    `the compose file's nginx keeps /metrics and /readyz off the public side, in any spelling${nginx.reason}`,
    async () => {
      const dir = join(temp, 'compose-nginx-internal');
      await mkdir(dir, { recursive: true });
      // One stand-in upstream that answers every path, so only nginx can refuse one.
      const upstream = createServer((request, response) => response.end(`upstream ${request.url}`));
      upstream.listen(0, '127.0.0.1');
      await once(upstream, 'listening');
      const upstreamPort = (upstream.address() as AddressInfo).port;
      const [appPort, downloadPort] = [await freePort(), await freePort()];
      const original = await readFile(join(INFRA, 'docker', 'nginx.conf'), 'utf8');
      const copy = join(dir, 'default.conf');
      await writeFile(
        copy,
        original
          .replace(/server [a-z0-9-]+:(\d+)/g, `server 127.0.0.1:${upstreamPort}`)
          .replace('listen 8080;', `listen 127.0.0.1:${appPort};`)
          .replace('listen 8081;', `listen 127.0.0.1:${downloadPort};`)
          .replaceAll('/var/log/nginx/', `${dir}/`),
      );
      const conf = await wrapper(dir, [copy]);
      const nginx = spawn(
        requireNginx(),
        ['-p', `${dir}/`, '-e', join(dir, 'error.log'), '-c', conf, '-g', 'daemon off;'],
        {
          stdio: 'ignore',
        },
      );
      try {
        const get = (port: number, path: string) =>
          new Promise<number>((resolve, reject) => {
            // node:http sends the path exactly as written (fetch would normalise it).
            httpGet({ host: '127.0.0.1', port, path }, (response) => {
              response.resume();
              resolve(response.statusCode as number);
            }).on('error', reject);
          });
        await expect.poll(() => get(appPort, '/healthz').catch(() => 0), { timeout: 10_000 }).toBe(200);
        for (const port of [appPort, downloadPort]) {
          expect(await get(port, '/healthz')).toBe(200);
          for (const path of [
            '/metrics',
            '/readyz',
            '//metrics',
            '/%6Detrics',
            '/readyz?full=1',
            '/./readyz',
          ])
            expect(await get(port, path), `${path} on ${port}`).toBe(404);
        }
      } finally {
        nginx.kill('SIGTERM');
        await once(nginx, 'exit');
        upstream.close();
      }
    },
  );

  it('compose.yaml parses; services, volumes, files and hosts it names exist; env is what each server reads', async () => {
    const dockerDir = join(INFRA, 'docker');
    const compose = parse(await readFile(join(dockerDir, 'compose.yaml'), 'utf8'), { merge: true }) as {
      services: Record<string, Record<string, unknown>>;
      volumes?: Record<string, unknown>;
    };
    const services = compose.services;
    expect(Object.keys(services).sort()).toEqual(
      [
        'app-server-1',
        'app-server-2',
        'download-server-1',
        'download-server-2',
        'nginx',
        'postgres',
        'redis',
      ].sort(),
    );
    expect(services.postgres?.image).toMatch(/^postgres:16/);
    expect(services.redis?.image).toMatch(/^redis:7/);
    expect(((services.redis?.command ?? []) as string[]).join(' ')).toContain(
      '--maxmemory-policy noeviction',
    );

    const appKeys = new Set(Object.keys(AppEnv.properties));
    const downloadKeys = new Set(Object.keys(DownloadEnv.properties));
    const hostsReferenced: string[] = [];
    for (const [name, service] of Object.entries(services)) {
      const dependsOn = service.depends_on as string[] | Record<string, unknown> | undefined;
      for (const dependency of Array.isArray(dependsOn) ? dependsOn : Object.keys(dependsOn ?? {})) {
        expect(services, `${name} depends on ${dependency}`).toHaveProperty([dependency]);
      }
      for (const volume of (service.volumes as string[] | undefined) ?? []) {
        const source = volume.split(':')[0] as string;
        if (source.startsWith('.') || source.startsWith('/')) {
          expect(existsSync(join(dockerDir, source)), `${name} mounts ${source}`).toBe(true);
        } else {
          expect(compose.volumes ?? {}, `${name} uses volume ${source}`).toHaveProperty([source]);
        }
      }
      const build = service.build as { context: string; dockerfile: string } | undefined;
      if (build) {
        const context = join(dockerDir, build.context);
        expect(existsSync(join(context, build.dockerfile)), `${name}: ${build.dockerfile}`).toBe(true);
        expect(existsSync(join(context, 'package-lock.json')), `${name}: context is the repository`).toBe(
          true,
        );
      }
      const environment = (service.environment ?? {}) as Record<string, string>;
      for (const value of Object.values(environment)) {
        const url = /^[a-z]+:\/\/(?:[^@/]*@)?([a-z0-9-]+)(?::\d+)?/.exec(String(value));
        if (url && !['localhost'].includes(url[1] as string)) hostsReferenced.push(url[1] as string);
      }
      const reads = name.startsWith('app-server')
        ? appKeys
        : name.startsWith('download-server')
          ? downloadKeys
          : null;
      if (reads) {
        for (const key of Object.keys(environment))
          expect(settable(reads, key), `${name} sets ${key}`).toBe(true);
        expect(environment.STORAGE_DIR).toBeDefined();
        expect(Object.keys(environment)).toEqual(expect.arrayContaining(S3_SETTINGS));
        // The token's issuer and audience: the same strings on every server.
        const first = services['app-server-1']?.environment as Record<string, string>;
        expect(environment.APP_PUBLIC_URL).toBe(first.APP_PUBLIC_URL);
        expect(environment.DOWNLOAD_PUBLIC_URL).toBe(first.DOWNLOAD_PUBLIC_URL);
      }
    }
    const appEnv = services['app-server-1']?.environment as Record<string, string>;
    const downloadEnv = services['download-server-1']?.environment as Record<string, string>;
    // The bucket settings pass through from the shell only when set (no value: unset otherwise,
    // so the volume stays the default); each server's credentials are its own.
    for (const key of ['S3_BUCKET', 'S3_PREFIX', 'S3_FORCE_PATH_STYLE', 'AWS_REGION', 'AWS_ENDPOINT_URL_S3'])
      expect([appEnv[key], downloadEnv[key]], key).toEqual([null, null]);
    expect(appEnv.AWS_ACCESS_KEY_ID).toMatch(/^\$\{APP_AWS_ACCESS_KEY_ID:-\}$/);
    expect(downloadEnv.AWS_ACCESS_KEY_ID).toMatch(/^\$\{DOWNLOAD_AWS_ACCESS_KEY_ID:-\}$/);
    expect(Object.keys(appEnv)).toEqual(
      expect.arrayContaining([
        'DATABASE_URL',
        'SESSION_SECRET',
        'KEY_ENCRYPTION_KEY',
        'NODE_ENV',
        'TRUST_PROXY',
      ]),
    );
    expect(Object.keys(downloadEnv)).toEqual(expect.arrayContaining(['REDIS_URL', 'JWKS_URL']));
    expect(Object.keys(downloadEnv)).not.toContain('DATABASE_URL');
    // A's replicas and B's replicas each share one storage volume.
    const storageOf = (name: string) =>
      (((services[name]?.volumes ?? []) as string[])[0] ?? '').split(':')[0];
    expect(
      new Set(['app-server-1', 'app-server-2', 'download-server-1', 'download-server-2'].map(storageOf)).size,
    ).toBe(1);

    // Hosts in URLs and in the nginx upstreams are services of the file.
    const nginxConf = await readFile(join(dockerDir, 'nginx.conf'), 'utf8');
    for (const match of nginxConf.matchAll(/server ([a-z0-9-]+):\d+/g))
      hostsReferenced.push(match[1] as string);
    expect(hostsReferenced.length).toBeGreaterThan(4);
    for (const host of hostsReferenced) expect(services, `host ${host}`).toHaveProperty([host]);
  });

  it.each([
    ['app-server', ['node', '--import', 'tsx', 'apps/app-server/src/server.ts'], 'APP_PORT'],
    ['download-server', ['node', 'server.mjs'], 'DOWNLOAD_PORT'],
  ])(
    '%s.Dockerfile: node:20-bookworm-slim, npm ci, non-root, SIGTERM, healthcheck, runs the server',
    async (name, command, portVariable) => {
      const text = await readFile(join(INFRA, 'docker', `${name}.Dockerfile`), 'utf8');
      const froms = [...text.matchAll(/^FROM (\S+)/gm)].map((m) => m[1]);
      expect(froms.length).toBeGreaterThan(0);
      for (const from of froms) expect(from).toBe('node:20-bookworm-slim');
      expect(text).toMatch(/^RUN npm ci\b/m);
      const users = [...text.matchAll(/^USER (\S+)/gm)].map((m) => m[1]);
      expect(users.at(-1)).toBeDefined();
      expect(users.at(-1)).not.toMatch(/^(root|0)$/);
      expect(text).toMatch(/^STOPSIGNAL SIGTERM$/m);
      expect(text).toMatch(/^HEALTHCHECK [\s\S]*\/healthz/m);
      expect(text).toContain(portVariable);
      const cmd = /^CMD (\[.*\])$/m.exec(text);
      expect(JSON.parse(cmd?.[1] ?? '[]')).toEqual(command);
      const ignore = await readFile(join(INFRA, 'docker', `${name}.Dockerfile.dockerignore`), 'utf8');
      expect(ignore).toMatch(/node_modules/);
    },
  );

  it('app-server.Dockerfile runs a source file that exists', async () => {
    expect(existsSync(join(ROOT, 'apps/app-server/src/server.ts'))).toBe(true);
  });

  it("download-server.Dockerfile's last stage holds only the bundle `npm run build` writes", async () => {
    const text = await readFile(join(INFRA, 'docker', 'download-server.Dockerfile'), 'utf8');
    const lastStage = text.slice(text.lastIndexOf('\nFROM '));
    expect(lastStage).not.toMatch(/npm ci/);
    expect(lastStage).toMatch(/^COPY --from=build \/app\/apps\/download-server\/dist\/server\.mjs \.\/$/m);
    expect(text).toMatch(/^RUN npm run build$/m);
    const manifest = JSON.parse(await readFile(join(ROOT, 'apps/download-server/package.json'), 'utf8'));
    expect(manifest.scripts.build).toContain('--outfile=dist/server.mjs');
    expect(manifest.scripts.build).toContain('--bundle');
  });

  it.each([
    ['sfh-app-server@.service', '--import tsx apps/app-server/src/server.ts', 'APP_PORT', '/etc/sfh/app.env'],
    [
      'sfh-download-server@.service',
      'apps/download-server/dist/server.mjs',
      'DOWNLOAD_PORT',
      '/etc/sfh/download.env',
    ],
  ])('%s: templated on the port, drains on SIGTERM, hardened', async (unit, entry, portVariable, envFile) => {
    const keys = unitKeys(await readFile(join(INFRA, 'systemd', unit), 'utf8'));
    expect(keys.get('EnvironmentFile')).toEqual([envFile]);
    expect(keys.get('Environment')).toContain(`${portVariable}=%i`);
    expect(keys.get('ExecStart')?.[0]).toMatch(new RegExp(`^(/usr/bin/)?node ${entry}$`));
    expect(keys.get('KillSignal')).toEqual(['SIGTERM']);
    // Longer than SHUTDOWN_GRACE_SECONDS (default 30) so a drain is never cut short.
    expect(Number(keys.get('TimeoutStopSec')?.[0])).toBeGreaterThan(30);
    expect(keys.get('NoNewPrivileges')).toEqual(['yes']);
    expect(keys.get('ProtectSystem')).toEqual(['strict']);
    expect(keys.get('ReadWritePaths')?.length).toBeGreaterThan(0);
    expect(keys.get('PrivateTmp')).toEqual(['yes']);
    expect(keys.get('User')?.[0]).not.toBe('root');
    if (unit.startsWith('sfh-download')) expect(keys.get('ExecReload')).toEqual(['/bin/kill -HUP $MAINPID']);
    // nginx connects to a socket in a folder of this instance that other users cannot enter.
    const name = unit.startsWith('sfh-app') ? 'sfh-app' : 'sfh-download';
    const socketVariable = unit.startsWith('sfh-app') ? 'APP_SOCKET_PATH' : 'DOWNLOAD_SOCKET_PATH';
    expect(keys.get('RuntimeDirectory')).toEqual([`${name}/%i`]);
    expect(keys.get('RuntimeDirectoryMode')).toEqual(['0750']);
    expect(keys.get('Environment')?.find((line) => line.startsWith(`${socketVariable}=`))).toMatch(
      new RegExp(`^${socketVariable}=/run/${name}/%i/[a-z]+\\.sock$`),
    );
  });

  it("the nginx examples reach this host's A and B on the units' sockets; A trusts only those (TRUST_PROXY=unix)", async () => {
    for (const [conf, name, socket] of [
      ['app.conf', 'sfh-app', 'app.sock'],
      ['download.conf', 'sfh-download', 'download.sock'],
      ['prefix.conf', 'sfh-app', 'app.sock'],
    ] as const) {
      const text = await readFile(join(INFRA, 'nginx', conf), 'utf8');
      // Every upstream server line (not `server {` blocks, not commented-out examples).
      const servers = [...text.matchAll(/^\s*server (?!\{)(\S+)/gm)].map((match) => match[1] as string);
      expect(servers.length, conf).toBeGreaterThan(0);
      for (const server of servers) expect(server, conf).toMatch(/^unix:\//);
      expect(text).toMatch(new RegExp(`server unix:/run/${name}/\\d+/${socket}`));
    }
    const unit = await readFile(join(INFRA, 'systemd', 'sfh-app-server@.service'), 'utf8');
    expect(unit).toMatch(/^#\s+TRUST_PROXY=unix\b/m);
    expect(await readFile(join(INFRA, 'nginx', 'app.conf'), 'utf8')).toMatch(/A runs[\s\S]*TRUST_PROXY=unix/);
  });

  it.each([
    ['sfh-app-server@.service', AppEnv],
    ['sfh-download-server@.service', DownloadEnv],
  ])(
    '%s: the environment its comment shows is what the server reads, S3 settings included',
    async (unit, env) => {
      const text = await readFile(join(INFRA, 'systemd', unit), 'utf8');
      const comments = text
        .split('\n')
        .filter((line) => line.startsWith('#'))
        .join('\n');
      const shown = [...comments.matchAll(/\b([A-Z][A-Z0-9_]{2,})=/g)].map((match) => match[1] as string);
      const ours = new Set(Object.keys(env.properties));
      for (const name of shown) expect(settable(ours, name), `${unit} shows ${name}`).toBe(true);
      expect(shown).toEqual(expect.arrayContaining([...S3_SETTINGS, 'AWS_SHARED_CREDENTIALS_FILE']));
    },
  );

  it.skipIf(systemd.skip)(
    `systemd-analyze verify accepts both units (as instances)${systemd.reason}`,
    async () => {
      const dir = join(temp, 'systemd');
      await mkdir(dir, { recursive: true });
      const instances: string[] = [];
      for (const [unit, port] of [
        ['sfh-app-server@.service', '3000'],
        ['sfh-download-server@.service', '3001'],
      ] as const) {
        await writeFile(join(dir, unit), await readFile(join(INFRA, 'systemd', unit)));
        const instance = join(dir, unit.replace('@.', `@${port}.`));
        await symlink(join(dir, unit), instance);
        instances.push(instance);
      }
      const result = await run('systemd-analyze', ['verify', ...instances]);
      // verify prints what it ignores (unknown keys, bad values) without failing: no output at all.
      expect(result, result.stderr).toMatchObject({ code: 0, stderr: '' });
    },
  );
});

describe.skipIf(postgres.skip || nginx.skip)(
  `infra/local-cluster.sh up → both origins ready through nginx → down, nothing left${postgres.reason}${nginx.reason}`,
  () => {
    let db: TestDatabase;
    let clusterDir: string;
    let env: NodeJS.ProcessEnv;
    let aLbPort: number;
    let bLbPort: number;

    beforeAll(async () => {
      requireNginx();
      db = await createTestDatabase();
      clusterDir = await mkdtemp(join(tmpdir(), 'sfh-cluster-'));
      const ports: number[] = [];
      for (let i = 0; i < 6; i++) ports.push(await freePort());
      const [a1, a2, b1, b2, aLb, bLb] = ports as [number, number, number, number, number, number];
      [aLbPort, bLbPort] = [aLb, bLb];
      env = {
        ...process.env,
        CLUSTER_DIR: clusterDir,
        A_PORTS: `${a1} ${a2}`,
        B_PORTS: `${b1},${b2}`,
        A_LB_PORT: String(aLb),
        B_LB_PORT: String(bLb),
        DATABASE_URL: db.url,
        REDIS_URL: process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379',
        REDIS_KEY_PREFIX: `test:cluster:${randomUUID()}:`,
        LOG_LEVEL: 'warn',
      };
    });

    afterAll(async () => {
      // Whatever happened above, leave nothing running.
      if (env) await run('bash', [CLUSTER_SCRIPT, 'down'], { env, timeoutMs: 90_000 });
      await db?.close();
      if (clusterDir) await rm(clusterDir, { recursive: true, force: true });
    }, 120_000);

    /** Every process the cluster runs: the pid files, plus nginx's workers. */
    async function clusterPids(): Promise<number[]> {
      const files = (await readdir(join(clusterDir, 'run'))).filter((f) => f.endsWith('.pid'));
      const pids = await Promise.all(
        [...files.map((f) => join(clusterDir, 'run', f)), join(clusterDir, 'nginx', 'nginx.pid')].map(
          async (file) => Number((await readFile(file, 'utf8')).trim()),
        ),
      );
      const master = pids.at(-1) as number;
      for (const entry of await readdir('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        const stat = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '');
        // pid (comm) state ppid ...
        const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
        if (ppid === master) pids.push(Number(entry));
      }
      return pids;
    }

    /** Whether the process runs (an exited one that nobody has reaped yet does not). */
    const alive = (pid: number) => {
      try {
        const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
        return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
      } catch {
        return false;
      }
    };

    it('starts, serves /readyz on both origins, reports status, and stops cleanly', async () => {
      const started = performance.now();
      const up = await run('bash', [CLUSTER_SCRIPT, 'up'], { env, timeoutMs: 150_000 });
      const upMs = performance.now() - started;
      expect(up.code, `${up.stdout}\n${up.stderr}`).toBe(0);
      expect(up.stdout).toContain(`http://localhost:${aLbPort}`);
      expect(up.stdout).toContain(`http://localhost:${bLbPort}`);

      for (const port of [aLbPort, bLbPort]) {
        const response = await fetch(`http://localhost:${port}/readyz`);
        expect(response.status, `nginx on ${port}`).toBe(200);
      }
      const status = await run('bash', [CLUSTER_SCRIPT, 'status'], { env });
      // A server that stopped says why in its log.
      const logs = status.code === 0 ? '' : (await run('bash', [CLUSTER_SCRIPT, 'logs'], { env })).stdout;
      expect(status.code, `${status.stdout}\n${logs}`).toBe(0);
      expect(status.stdout.match(/running/g)).toHaveLength(5);

      const pids = await clusterPids();
      expect(pids.length).toBeGreaterThanOrEqual(6);
      expect(pids.every(alive)).toBe(true);

      const stopping = performance.now();
      const down = await run('bash', [CLUSTER_SCRIPT, 'down'], { env, timeoutMs: 90_000 });
      const downMs = performance.now() - stopping;
      expect(down.code, `${down.stdout}\n${down.stderr}`).toBe(0);
      expect(down.stdout).not.toContain('SIGKILL');
      expect(pids.filter(alive), 'processes left running').toEqual([]);
      for (const port of [aLbPort, bLbPort]) {
        await expect(fetch(`http://127.0.0.1:${port}/readyz`)).rejects.toThrow();
      }
      // And nothing else that this cluster started (its servers carry SFH_CLUSTER_DIR).
      const leftovers: string[] = [];
      for (const entry of await readdir('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        const environ = await readFile(`/proc/${entry}/environ`, 'utf8').catch(() => '');
        if (environ.split('\0').includes(`SFH_CLUSTER_DIR=${clusterDir}`)) leftovers.push(entry);
      }
      expect(leftovers).toEqual([]);
      expect((await run('bash', [CLUSTER_SCRIPT, 'status'], { env })).code).toBe(3);
      console.log(`local cluster: up ${Math.round(upMs)} ms, down ${Math.round(downMs)} ms`);
    }, 240_000);
  },
);

describe.skipIf(nginx.skip)(
  `public URLs with a path prefix, through infra/nginx/prefix.conf${nginx.reason}`,
  () => {
    it('A and B under /files and /dl: links, tokens, renewal and keys all carry the prefix', async () => {
      const dir = await mkdtemp(join(tmpdir(), 'sfh-prefix-'));
      const started: { stop(): Promise<unknown> }[] = [];
      try {
        await cp(inject('pgliteTemplate'), join(dir, 'data', 'pg'), { recursive: true });
        const [proxyPort, appPort, downloadPort] = [await freePort(), await freePort(), await freePort()];
        const proxy = `http://127.0.0.1:${proxyPort}`;
        // nginx reaches A and B on their Unix sockets, as in production (TRUST_PROXY=unix on A).
        const appSocket = join(dir, 'run', 'app.sock');
        const downloadSocket = join(dir, 'run', 'download.sock');
        const original = await readFile(join(INFRA, 'nginx', 'prefix.conf'), 'utf8');
        expect(original).toContain('server unix:/run/sfh-app/3000/app.sock;');
        const conf = join(dir, 'prefix.conf');
        await writeFile(
          conf,
          original
            .replace('server unix:/run/sfh-app/3000/app.sock;', `server unix:${appSocket};`)
            .replace('server unix:/run/sfh-download/3001/download.sock;', `server unix:${downloadSocket};`)
            .replace('listen 80;', `listen 127.0.0.1:${proxyPort};`)
            .replaceAll('/var/log/nginx/', `${dir}/`),
        );
        const nginx = spawn(
          requireNginx(),
          [
            '-p',
            `${dir}/`,
            '-e',
            join(dir, 'error.log'),
            '-c',
            await wrapper(dir, [conf]),
            '-g',
            // Started as root, nginx would run its workers as nobody, whom the sockets' 0700
            // folder keeps out; a deployment puts nginx's user in A's group instead (infra/systemd).
            process.getuid?.() === 0 ? 'daemon off; user root;' : 'daemon off;',
          ],
          { stdio: 'ignore' },
        );
        started.push({
          async stop() {
            if (nginx.exitCode !== null) return;
            nginx.kill('SIGQUIT');
            await once(nginx, 'exit');
          },
        });

        const urls = { APP_PUBLIC_URL: `${proxy}/files`, DOWNLOAD_PUBLIC_URL: `${proxy}/dl` };
        const shared = { ...urls, DATA_DIR: join(dir, 'data'), LOG_LEVEL: 'warn' };
        started.push(
          await startServer(
            APP_SERVER,
            {
              ...shared,
              ...CHEAP_PASSWORDS,
              APP_PORT: String(appPort),
              APP_SOCKET_PATH: appSocket,
              TRUST_PROXY: 'unix',
            },
            `${urls.APP_PUBLIC_URL}/readyz`,
          ),
        );
        // B reads A's keys at its default JWKS_URL, through the proxy, and is ready through it.
        started.push(
          await startServer(
            DOWNLOAD_SERVER,
            { ...shared, DOWNLOAD_PORT: String(downloadPort), DOWNLOAD_SOCKET_PATH: downloadSocket },
            `${urls.DOWNLOAD_PUBLIC_URL}/readyz`,
          ),
        );

        // A user of A under /files, with a cookie and the CSRF token, as the README's walkthrough.
        let cookies = new CookieJar();
        const a = async (path: string, init: RequestInit & { csrf?: string } = {}) => {
          const headers = new Headers(init.headers);
          const cookie = cookies.header();
          if (cookie) headers.set('cookie', cookie);
          if (init.csrf) headers.set('x-csrf-token', init.csrf);
          const response = await fetch(`${urls.APP_PUBLIC_URL}${path}`, {
            ...init,
            headers,
            redirect: 'manual',
          });
          cookies.update(response);
          return response;
        };
        const csrf = async () => ((await (await a('/api/csrf')).json()) as { token: string }).token;
        const register = await a('/api/auth/register', {
          method: 'POST',
          csrf: await csrf(),
          headers: { 'content-type': 'application/json', origin: proxy },
          body: JSON.stringify({ username: 'prefixed', password: 'correct horse battery' }),
        });
        expect(register.status, await register.clone().text()).toBe(201);
        const token = await csrf();
        const form = new FormData();
        form.append('file', new Blob(['behind a prefix\n']), 'prefix.txt');
        const upload = await a('/api/files', { method: 'POST', csrf: token, body: form });
        expect(upload.status).toBe(201);
        const { file } = (await upload.json()) as { file: { id: string } };
        const minted = await a(`/api/files/${file.id}/download-token`, { method: 'POST', csrf: token });
        const { url, token: jwt } = (await minted.json()) as { url: string; token: string };

        expect(url.startsWith(`${urls.DOWNLOAD_PUBLIC_URL}/d/`)).toBe(true);
        expect(decodeJwt(jwt)).toMatchObject({ iss: urls.APP_PUBLIC_URL, aud: urls.DOWNLOAD_PUBLIC_URL });
        const first = await fetch(url);
        expect(first.status).toBe(200);
        expect(await first.text()).toBe('behind a prefix\n');

        // Used: B's renewal link goes back to A under its prefix, and A's redirect to B under its.
        const again = await fetch(url, { headers: { accept: 'application/json' } });
        expect(again.status).toBe(410);
        const { renewUrl } = (await again.json()) as { renewUrl: string };
        expect(renewUrl).toBe(`${urls.APP_PUBLIC_URL}/files/${file.id}/download`);
        const renewed = await a(renewUrl.slice(urls.APP_PUBLIC_URL.length));
        expect(renewed.status).toBe(303);
        const location = renewed.headers.get('location') ?? '';
        expect(location.startsWith(`${urls.DOWNLOAD_PUBLIC_URL}/d/`)).toBe(true);
        expect(await (await fetch(location)).text()).toBe('behind a prefix\n');

        // A's pages link, post and redirect under its prefix, so a browser stays behind the proxy.
        const page = await a('/');
        expect(page.status).toBe(200);
        const html = await page.text();
        const targets = [...html.matchAll(/(?:href|action|src)="([^"#]*)"/g)].map((m) => m[1] as string);
        expect(targets).toContain('/files/sessions');
        expect(targets).toContain(`/files/files/${file.id}/download`);
        expect(targets.filter((target) => target.startsWith('/') && !target.startsWith('/files/'))).toEqual(
          [],
        );
        expect(html).toContain('data-api="/files/api/files"');
        expect((await a('/assets/app.css')).status).toBe(200);
        cookies = new CookieJar();
        const signedOut = await a('/sessions', { headers: { accept: 'text/html' } });
        expect(signedOut.status).toBe(303);
        expect(signedOut.headers.get('location')).toBe('/files/login?next=%2Fsessions');

        const accessLog = await readFile(join(dir, 'sfh-prefix-access.log'), 'utf8');
        expect(accessLog).toContain('/dl/d/[token]');
        expect(accessLog).not.toContain(jwt.split('.')[2] as string);
      } finally {
        for (const server of started.reverse()) await server.stop();
        await rm(dir, { recursive: true, force: true });
      }
    }, 90_000);
  },
);
