import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { connect } from 'node:net';

function portAnswers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/**
 * A redis-server of our own on `port` (no persistence, so a restart starts empty), pinned to
 * `cpu` with taskset when given; resolves once it listens. Whoever starts it kills it.
 */
export async function spawnRedis(
  port: number,
  options: { extraArgs?: string[]; cpu?: string | undefined } = {},
): Promise<ChildProcess> {
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
  args.push(...(options.extraArgs ?? []));
  const child = options.cpu
    ? spawn('taskset', ['-c', options.cpu, 'redis-server', ...args], { stdio: 'ignore' })
    : spawn('redis-server', args, { stdio: 'ignore' });
  const deadline = Date.now() + 10_000;
  while (!(await portAnswers(port))) {
    if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
    if (Date.now() > deadline) {
      await killRedis(child);
      throw new Error(`redis-server did not listen on ${port}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  return child;
}

/** SIGKILL, as a crash: resolves once the process has gone. */
export async function killRedis(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGKILL');
  await exited;
}
