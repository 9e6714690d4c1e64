import { readdir, readFile } from 'node:fs/promises';

/** Resident set size of a process, in bytes (Linux: /proc/<pid>/status). */
export async function rss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? Number.NaN) * 1024;
}

/** How many file descriptors a process has open (Linux: /proc/<pid>/fd). */
export const openFds = (pid: number) => readdir(`/proc/${pid}/fd`).then((fds) => fds.length);
