/**
 * `npm start` (A and B), `npm run start:app` (A), `npm run start:download` (B): runs the servers
 * as child processes and stops every one of them with a drain, however it is asked to stop.
 *
 * Why a launcher: npm runs a script through `sh -c`, which passes no signal on; npm forwards
 * only SIGINT and SIGTERM and dies of a SIGHUP; and a closed terminal sends SIGHUP to its whole
 * process group, which B takes as "reload the keys". So here:
 * - the servers run in a process group of their own: only this launcher signals them;
 * - SIGTERM, SIGINT or SIGHUP here, or npm going away (this process re-parented), sends each
 *   server one SIGTERM, their drain; the servers also drain if this launcher dies (IPC closes);
 * - a server that exits stops the others, and the launcher exits with its code;
 * - once every server says it is ready, one line with their public URLs;
 * - each server gets only the variables its config schema reads, the AWS SDK's, and what Node
 *   and the C library need (below): B never holds A's KEY_ENCRYPTION_KEY, SESSION_SECRET or
 *   DATABASE_URL, whatever the shell exported.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { AWS_SDK_ENV } from '@sfh/config';
import type { ReadyMessage } from '@sfh/lifecycle';
import type { TObject } from '@sinclair/typebox';
import { AppEnv } from '../apps/app-server/src/config.ts';
import { DownloadEnv } from '../apps/download-server/src/config.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface Server {
  args: string[];
  /** The server's config schema: the variables it reads. */
  schema: TObject;
  /**
   * The prefix of this server's own AWS settings in the launcher's environment:
   * `DOWNLOAD_AWS_ACCESS_KEY_ID` becomes B's `AWS_ACCESS_KEY_ID` (the compose file's names), so
   * B can read the bucket with a read-only user while A writes with its own.
   */
  awsPrefix: string;
  /** More variables a library of the server reads (`pg`: PGPASSWORD, PGSSLMODE, ...). */
  also?: RegExp;
}

const SERVERS = {
  app: {
    args: ['--import', 'tsx', 'apps/app-server/src/server.ts'],
    schema: AppEnv,
    awsPrefix: 'APP_',
    also: /^PG[A-Z]+$/,
  },
  download: { args: ['apps/download-server/dist/server.mjs'], schema: DownloadEnv, awsPrefix: 'DOWNLOAD_' },
} satisfies Record<string, Server>;
type Name = keyof typeof SERVERS;

/**
 * What Node (its documented `NODE_*` variables, not every `NODE_` name: CI keeps npm's
 * `NODE_AUTH_TOKEN` there), tsx and the C library read: search path, home, temp folder, time
 * zone, locale, certificates, colours.
 */
const RUNTIME =
  /^(PATH|HOME|USER|LOGNAME|TMPDIR|TZ|LANG|LANGUAGE|LC_[A-Z]+|NODE_(OPTIONS|EXTRA_CA_CERTS|ICU_DATA|NO_WARNINGS|DEBUG|DEBUG_NATIVE|PATH|PENDING_DEPRECATION|PRESERVE_SYMLINKS|REDIRECT_WARNINGS|TLS_REJECT_UNAUTHORIZED|V8_COVERAGE|COMPILE_CACHE|DISABLE_COLORS|USE_ENV_PROXY)|UV_THREADPOOL_SIZE|TERM|NO_COLOR|FORCE_COLOR|SSL_CERT_FILE|SSL_CERT_DIR)$/;
const AWS_CREDENTIALS = ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN'];

/**
 * The environment a server starts with: only what it reads. A server's own AWS settings
 * (`<prefix>AWS_*`) win over the shared ones; its own access key replaces the shared
 * credentials as a whole, so it never runs on one user's key with another's secret.
 */
function environmentOf(server: Server): NodeJS.ProcessEnv {
  const reads = new Set<string>([...Object.keys(server.schema.properties), ...AWS_SDK_ENV]);
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (reads.has(name) || RUNTIME.test(name) || server.also?.test(name)) env[name] = value;
  }
  if (process.env[`${server.awsPrefix}AWS_ACCESS_KEY_ID`] !== undefined)
    for (const name of AWS_CREDENTIALS) delete env[name];
  for (const name of AWS_SDK_ENV) {
    const own = process.env[`${server.awsPrefix}${name}`];
    if (own !== undefined) env[name] = own;
  }
  return env;
}

const which = process.argv[2];
const names: Name[] = which === 'app' || which === 'download' ? [which] : ['app', 'download'];

// B runs as deployed: its bundle, built from the current source.
if (names.includes('download')) {
  const build = spawnSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, stdio: 'inherit' });
  if (build.status !== 0) process.exit(build.status ?? 1);
}

const children = new Map<Name, ChildProcess>();
const ready = new Map<Name, string>();
let stopping = false;
let exitCode = 0;

function stop(reason: string, code = 0) {
  if (stopping) return;
  stopping = true;
  exitCode = code;
  process.stderr.write(`${reason}: stopping ${names.join(' and ')} (draining)\n`);
  for (const child of children.values()) if (child.exitCode === null) child.kill('SIGTERM');
}

for (const name of names) {
  const server: Server = SERVERS[name];
  const child = spawn(process.execPath, server.args, {
    cwd: ROOT,
    env: environmentOf(server),
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    detached: true,
  });
  children.set(name, child);
  child.on('message', (message: ReadyMessage) => {
    if (!message?.ready) return;
    ready.set(name, `${message.ready.server} at ${message.ready.publicUrl}`);
    if (ready.size === names.length) process.stdout.write(`ready: ${[...ready.values()].join(', ')}\n`);
  });
  child.on('exit', (code, signal) => {
    if (stopping) exitCode ||= code ?? 1;
    else stop(`${name} exited (${signal ?? code})`, code || 1);
  });
}

for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(signal, () => stop(signal));
// npm dies of a SIGHUP without passing it on: this process is then re-parented.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) stop('npm went away');
}, 200).unref();

await Promise.all(
  [...children.values()].map((child) => (child.exitCode === null ? once(child, 'exit') : null)),
);
process.exit(exitCode);
