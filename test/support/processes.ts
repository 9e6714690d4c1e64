import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export const APP_SERVER = 'apps/app-server/src/server.ts';
/** B as `npm start`, the images and the systemd units run it: bundled by `npm run build`. */
export const DOWNLOAD_SERVER = 'apps/download-server/dist/server.mjs';

/** Bundles B from its current source (`npm run build`), so tests run what operators deploy. */
export function buildDownloadServer(): void {
  execFileSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, stdio: 'inherit' });
}

/** Node's arguments for an entry point: TypeScript through tsx, a bundle as it is. */
export function nodeArgsFor(entry: string): string[] {
  return entry.endsWith('.ts') ? ['--import', 'tsx', entry] : [entry];
}

/**
 * The first port of the kernel's ephemeral range, from which it picks the source port of every
 * outgoing connection (Linux's default is 32768).
 */
const EPHEMERAL_START = (() => {
  try {
    return (
      Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768
    );
  } catch {
    return 32768;
  }
})();

/**
 * A port that was free a moment ago, for a server another process will listen on. Chosen at
 * random below the ephemeral range: a port the OS handed out (`listen(0)`) comes from that range,
 * so between closing it here and the server binding it, any outgoing connection of a parallel test
 * (to Postgres, Redis, the bucket) could take it as its source port, and the server then fails
 * with EADDRINUSE.
 */
export async function freePort(): Promise<number> {
  const low = 10_000;
  for (;;) {
    const port = low + Math.floor(Math.random() * (EPHEMERAL_START - low));
    const server = createServer();
    const bound = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => resolve(true));
    });
    if (!bound) continue;
    server.close();
    await once(server, 'close');
    return port;
  }
}

export interface ServerProcess {
  child: ChildProcess;
  /** Everything the process wrote, for assertions and for debugging a failed test. */
  output(): string;
  /** Sends SIGTERM and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * Starts one of the servers as a real process, exactly as `npm run start:*` does, and waits
 * until `readyUrl` answers 200.
 */
export async function startServer(
  entry: string,
  env: Record<string, string>,
  readyUrl: string,
): Promise<ServerProcess> {
  const child = spawn(process.execPath, nodeArgsFor(entry), {
    cwd: ROOT,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, LOG_LEVEL: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout?.on('data', (chunk) => {
    output += chunk;
  });
  child.stderr?.on('data', (chunk) => {
    output += chunk;
  });
  const exited = once(child, 'exit').then(([code]) => code as number | null);
  const server: ServerProcess = {
    child,
    output: () => output,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${entry} exited with ${child.exitCode}:\n${output}`);
    const ok = await fetch(readyUrl).then(
      (response) => response.ok,
      () => false,
    );
    if (ok) return server;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await server.stop('SIGKILL');
  throw new Error(`${entry} did not become ready at ${readyUrl}:\n${output}`);
}
