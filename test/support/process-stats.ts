import { readdir, readFile, readlink } from 'node:fs/promises';

/** Resident set size of a process, in bytes (Linux: /proc/<pid>/status). */
export async function rss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? Number.NaN) * 1024;
}

/**
 * How many file descriptors a process has open (Linux: /proc/<pid>/fd), not counting those on
 * files under `except` (say, the embedded database's own files: PGlite keeps every relation file
 * it has touched open, and opens more as tables grow).
 */
export async function openFds(pid: number, except?: string): Promise<number> {
  const fds = await readdir(`/proc/${pid}/fd`);
  if (!except) return fds.length;
  const targets = await Promise.all(fds.map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  return targets.filter((target) => !target.startsWith(`${except}/`)).length;
}
