import { spawnSync } from 'node:child_process';

/** The nginx binary (on PATH, or where Debian puts it), undefined when none is installed. */
export const NGINX_BINARY = ['nginx', '/usr/sbin/nginx'].find((bin) => spawnSync(bin, ['-v']).status === 0);
