/**
 * The README's commands, run as a newcomer pastes them, against A and B as real processes: the
 * curl walkthrough (twice: the second run finds alice registered), then the download commands
 * for curl, wget and aria2c (twice: the second time the files are complete), and the keys CLI
 * piped into jq as the runbook shows it.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnless } from '../support/skip.ts';
import { type Stack, startStack } from '../support/stack.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CLIENTS = ['/usr/bin/curl', '/usr/bin/wget', '/usr/bin/aria2c', '/usr/bin/jq'];

/** The first ```sh block after the line `heading` of the README. */
async function readmeBlock(heading: string): Promise<string> {
  const readme = await readFile(join(ROOT, 'README.md'), 'utf8');
  const at = readme.indexOf(`\n${heading}\n`);
  expect(at, heading).toBeGreaterThan(0);
  const match = /```sh\n([\s\S]*?)```/.exec(readme.slice(at));
  return match?.[1] ?? '';
}

function bash(script: string, env: NodeJS.ProcessEnv = process.env) {
  return new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile(
      'bash',
      ['-e', '-o', 'pipefail', '-c', script],
      { cwd: ROOT, env, timeout: 60_000 },
      (error, stdout, stderr) => resolve({ code: error ? Number(error.code ?? 1) : 0, stdout, stderr }),
    );
  });
}

const missing = skipUnless(
  "the README's commands",
  CLIENTS.some((client) => !existsSync(client)) &&
    'needs curl, wget, aria2c and jq (apt-get install -y curl wget aria2 jq)',
);

describe.skipIf(missing.skip)(`the README's commands work as pasted${missing.reason}`, () => {
  let stack: Stack;

  beforeAll(async () => {
    stack = await startStack();
  }, 120_000);
  afterAll(async () => {
    await stack?.stop();
  });

  it('the curl walkthrough and the download commands, each twice', async () => {
    const walkthrough = await readmeBlock('## The whole path with curl');
    const clients = await readmeBlock('### Downloading with curl, wget, aria2c or a browser');
    expect(walkthrough).toContain('A=http://localhost:3000\n');
    const script = [
      walkthrough.replace('A=http://localhost:3000\n', `A=${stack.appOrigin}\n`),
      clients,
      'for f in by-curl.txt by-wget.txt by-aria2c.txt; do echo "$f: $(cat $f)"; done',
      // Again, on complete files: nothing is sent, nothing fails, nothing is appended.
      clients,
      'for f in by-curl.txt by-wget.txt by-aria2c.txt; do echo "$f again: $(cat $f)"; done',
    ].join('\n');
    for (const run of ['first', 'second']) {
      const result = await bash(script);
      expect(result.code, `${run} run:\n${result.stdout}\n${result.stderr}\n${stack.b.output()}`).toBe(0);
      expect(result.stderr, `${run} run`).toBe('');
      const lines = result.stdout.split('\n');
      expect(lines.filter((line) => line === 'hello from A and B')).toHaveLength(2);
      expect(result.stdout).toContain('"error":"TOKEN_USED"');
      for (const file of ['by-curl.txt', 'by-wget.txt', 'by-aria2c.txt']) {
        expect(lines).toContain(`${file}: hello from A and B`);
        expect(lines).toContain(`${file} again: hello from A and B`);
      }
    }
  });

  it('the sharing commands: page, wrong password, form and JSON downloads, the count, revoke', async () => {
    const walkthrough = await readmeBlock('## The whole path with curl');
    const sharing = await readmeBlock('## Sharing');
    const result = await bash(
      [walkthrough.replace('A=http://localhost:3000\n', `A=${stack.appOrigin}\n`), sharing].join('\n'),
    );
    expect(result.code, `${result.stdout}\n${result.stderr}`).toBe(0);
    expect(result.stderr).toBe('');
    const lines = result.stdout.split('\n');
    const link = lines.find((line) => line.startsWith(`${stack.appOrigin}/s/`));
    expect(link).toBeDefined();
    // The page (200), the wrong password, two downloads, the count, the revoke (204), then 404.
    expect(lines).toContain('200');
    expect(result.stdout).toContain('"error":"INVALID_CREDENTIALS"');
    // The walkthrough downloads twice itself (steps 6 and 8), the sharing block twice more.
    expect(lines.filter((line) => line === 'hello from A and B')).toHaveLength(4);
    expect(result.stdout).toMatch(/downloads: 2,/);
    expect(lines.slice(-3)).toEqual(['204', '404', '']);
  });

  it("the runbook's keys CLI pipes into jq (npm run -s: no banner on stdout)", async () => {
    const runbook = await readmeBlock('### Runbook');
    expect(runbook).not.toMatch(/npm run keys/);
    const piped = runbook.split('\n').find((line) => line.includes('| jq'));
    expect(piped).toBeDefined();
    const result = await bash(piped as string, {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      ...stack.appEnv,
    });
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toMatch(/^[\w-]{20,}\n$/);
  });
});
