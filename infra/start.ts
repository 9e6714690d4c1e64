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
 * - once every server says it is ready, one line with their public URLs.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import type { ReadyMessage } from '@sfh/lifecycle';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const SERVERS = {
  app: ['--import', 'tsx', 'apps/app-server/src/server.ts'],
  download: ['apps/download-server/dist/server.mjs'],
} as const;
type Name = keyof typeof SERVERS;

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
  const child = spawn(process.execPath, SERVERS[name], {
    cwd: ROOT,
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
