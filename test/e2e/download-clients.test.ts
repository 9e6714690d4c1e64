/**
 * Real download clients against both servers as real processes (README "Resuming,
 * renewal and single use with real clients"): `curl -C -` and `wget -c` resume an interrupted
 * download through A's `/files/:id/download` (A mints a fresh token and answers 303, B answers
 * the Range with 206), resume across tokens with Range + If-Range, and a browser that opens a
 * used B link is sent back to A.
 */
import { execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionClient } from '../support/http-client.ts';
import type { ServerProcess } from '../support/processes.ts';
import { S3_SKIP } from '../support/s3.ts';
import { skipUnless } from '../support/skip.ts';
import { type Stack, startStack } from '../support/stack.ts';

const CURL = '/usr/bin/curl';
const WGET = '/usr/bin/wget';
const ARIA2 = '/usr/bin/aria2c';
const MIB = 1024 * 1024;
const BROWSER_ACCEPT = 'text/html,application/xhtml+xml,*/*;q=0.8';
const USERNAME = 'carol';
const PASSWORD = 'correct horse battery';

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a client process to completion; never throws, so the exit code can be asserted. */
function run(file: string, args: string[], cwd: string): Promise<Run> {
  return new Promise((resolve) => {
    execFile(file, args, { cwd, timeout: 30_000, maxBuffer: 16 * MIB }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

// curl and wget are the real clients under test. A developer machine without them skips this
// file; CI installs them, and there a missing one fails.
const clientsInstalled = existsSync(CURL) && existsSync(WGET) && existsSync(ARIA2);

// On the local disk, and with the bytes in S3 (A and B sharing nothing but the bucket).
const storages: ('local' | 's3')[] = ['local', ...(S3_SKIP ? [] : (['s3'] as const))];
const clients = skipUnless(
  'real download clients',
  !clientsInstalled && 'no curl, wget or aria2c (apt-get install -y curl wget aria2)',
);
describe.skipIf(clients.skip).each(storages)(
  `real clients resume downloads across single-use tokens (%s storage)${clients.reason}`,
  (storage) => {
    let stack: Stack;
    let work: string;
    let b: ServerProcess;
    let appOrigin: string;
    let downloadOrigin: string;
    let user: SessionClient;
    let fileId: string;
    const original = randomBytes(5 * MIB);

    beforeAll(async () => {
      work = await mkdtemp(join(tmpdir(), 'sfh-e2e-clients-work-'));
      stack = await startStack({ storage });
      ({ b, appOrigin, downloadOrigin } = stack);

      user = new SessionClient(appOrigin);
      const credentials = JSON.stringify({ username: USERNAME, password: PASSWORD });
      const register = await user.fetch('/api/auth/register', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: credentials,
      });
      expect(register.status).toBe(201);
      const form = new FormData();
      form.append('file', new Blob([original], { type: 'application/octet-stream' }), 'random.bin');
      const upload = await user.json<{ file: { id: string; size: number; sha256: string } }>('/api/files', {
        method: 'POST',
        body: form,
      });
      expect(upload.status).toBe(201);
      expect(upload.body.file).toMatchObject({ size: original.length, sha256: sha256(original) });
      fileId = upload.body.file.id;

      // A cookie jar for A written by curl itself: fetch the CSRF token (this starts the session),
      // then sign in with it. curl writes the Netscape format wget reads as well.
      const jar = join(work, 'jar.txt');
      const csrf = await run(CURL, ['-s', '-f', '-c', jar, '-b', jar, `${appOrigin}/api/csrf`], work);
      expect(csrf.code, csrf.stderr).toBe(0);
      const { token } = JSON.parse(csrf.stdout) as { token: string };
      const login = await run(
        CURL,
        [
          '-s',
          '-f',
          '-c',
          jar,
          '-b',
          jar,
          '-H',
          `x-csrf-token: ${token}`,
          '-H',
          'content-type: application/json',
          '-d',
          credentials,
          `${appOrigin}/api/auth/login`,
        ],
        work,
      );
      expect(login.code, `${login.stdout}${login.stderr}`).toBe(0);
      expect(JSON.parse(login.stdout)).toMatchObject({ user: { username: USERNAME } });
    }, 120_000);

    afterAll(async () => {
      await stack?.stop();
      await rm(work, { recursive: true, force: true });
    });

    it('curl -C - finishes an interrupted download through A’s link: 303 → B 206, bytes identical', async () => {
      const out = join(work, 'out.bin');
      await writeFile(out, original.subarray(0, MIB));
      const jar = join(work, 'jar.txt');
      const result = await run(
        CURL,
        [
          '-s',
          '-S',
          '-f',
          '-L',
          '-b',
          jar,
          '-C',
          '-',
          '-o',
          out,
          // What the last hop answered, to show it really was a resumed (206) transfer.
          '-w',
          '%{http_code} %{num_redirects} %{size_download}',
          `${appOrigin}/files/${fileId}/download`,
        ],
        work,
      );
      expect(result.code, `${result.stderr}\n${b.output()}`).toBe(0);
      expect(result.stdout).toBe(`206 1 ${original.length - MIB}`);
      const received = await readFile(out);
      expect(received.length).toBe(original.length);
      expect(sha256(received)).toBe(sha256(original));
    });

    it('wget -c finishes an interrupted download through A’s link with curl’s cookie jar', async () => {
      const out = join(work, 'out2.bin');
      await writeFile(out, original.subarray(0, 2 * MIB));
      // curl marks HttpOnly cookies with a `#HttpOnly_` prefix on the domain; wget 1.21 reads such a
      // line as a comment (checked: it sends no Cookie header at all) and would arrive at A signed
      // out. A copy of the jar without the prefix is the same cookie for wget.
      const curlJar = await readFile(join(work, 'jar.txt'), 'utf8');
      expect(curlJar).toContain('#HttpOnly_');
      const wgetJar = join(work, 'jar-wget.txt');
      await writeFile(wgetJar, curlJar.replaceAll(/^#HttpOnly_/gm, ''));
      const result = await run(
        WGET,
        ['-nv', '-c', '-S', '--load-cookies', wgetJar, '-O', out, `${appOrigin}/files/${fileId}/download`],
        work,
      );
      // -q would hide the server responses; -S prints them on stderr, so the hops can be checked.
      expect(result.code, `${result.stderr}\n${b.output()}`).toBe(0);
      expect(result.stderr).toMatch(/HTTP\/1\.1 303/);
      expect(result.stderr).toMatch(/HTTP\/1\.1 206/);
      expect(result.stderr.toLowerCase()).toContain(
        `content-range: bytes ${2 * MIB}-${original.length - 1}/${original.length}`,
      );
      const received = await readFile(out);
      expect(received.length).toBe(original.length);
      expect(sha256(received)).toBe(sha256(original));
    });

    it('aria2c -c finishes a killed download through A’s link: each run gets a fresh token, bytes identical', async () => {
      // A file of tens of MiB, so the kill comes mid-download.
      const big = randomBytes(24 * MIB);
      const form = new FormData();
      form.append('file', new Blob([big], { type: 'application/octet-stream' }), 'big.bin');
      const upload = await user.json<{ file: { id: string } }>('/api/files', { method: 'POST', body: form });
      expect(upload.status).toBe(201);
      const link = `${appOrigin}/files/${upload.body.file.id}/download`;
      // aria2 reads the Netscape jar, but not curl's `#HttpOnly_` lines (as wget, see above).
      const jar = join(work, 'jar-aria2.txt');
      await writeFile(jar, (await readFile(join(work, 'jar.txt'), 'utf8')).replaceAll(/^#HttpOnly_/gm, ''));
      const out = join(work, 'aria2-a.bin');
      const common = ['--load-cookies', jar, '--file-allocation=none', '-d', work, '-o', 'aria2-a.bin'];
      const child = spawn(ARIA2, ['-q', '--max-download-limit=4M', ...common, link], { stdio: 'ignore' });
      const exited = new Promise((resolve) => child.once('exit', resolve));
      while (((await stat(out).catch(() => undefined))?.size ?? 0) < 4 * MIB) {
        expect(child.exitCode, 'aria2c ended before the kill').toBeNull();
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      child.kill('SIGKILL');
      await exited;
      expect((await stat(out)).size).toBeLessThan(big.length);

      const result = await run(ARIA2, ['-c', ...common, link], work);
      expect(result.code, `${result.stdout}${result.stderr}\n${b.output()}`).toBe(0);
      const received = await readFile(out);
      expect(received.length).toBe(big.length);
      expect(sha256(received)).toBe(sha256(big));
    });

    /** A fresh B link from A's API, as the UI gets it. */
    async function mint(): Promise<string> {
      const res = await user.json<{ url: string; token: string }>(`/api/files/${fileId}/download-token`, {
        method: 'POST',
      });
      expect(res.status).toBe(201);
      return res.body.url;
    }

    it('resume on one token, and across tokens: token 1 gives the first part, token 2 + If-Range the rest', async () => {
      const first = await mint();
      const part1 = await fetch(first, { headers: { range: 'bytes=0-99999' } });
      expect(part1.status).toBe(206);
      expect(part1.headers.get('content-range')).toBe(`bytes 0-99999/${original.length}`);
      const etag = part1.headers.get('etag');
      expect(etag).toBe(`"${sha256(original)}"`);
      const head = Buffer.from(await part1.arrayBuffer());
      expect(head.length).toBe(100_000);

      // One download per token: the bytes already sent are refused under that token...
      const replay = await fetch(first, { headers: { range: 'bytes=0-', accept: 'application/json' } });
      expect(replay.status).toBe(410);
      expect(await replay.json()).toMatchObject({
        error: 'TOKEN_USED',
        renewUrl: `${appOrigin}/files/${fileId}/download`,
      });
      // ... and the rest is not: a resume with the same token gets exactly it.
      const rest = await fetch(first, { headers: { range: 'bytes=100000-' } });
      expect(rest.status).toBe(206);
      const restBytes = Buffer.from(await rest.arrayBuffer());
      expect(sha256(Buffer.concat([original.subarray(0, 100_000), restBytes]))).toBe(sha256(original));

      const part2 = await fetch(await mint(), {
        headers: { range: 'bytes=100000-', 'if-range': etag as string },
      });
      expect(part2.status).toBe(206);
      expect(part2.headers.get('content-range')).toBe(
        `bytes 100000-${original.length - 1}/${original.length}`,
      );
      const tail = Buffer.from(await part2.arrayBuffer());
      expect(sha256(Buffer.concat([head, tail]))).toBe(sha256(original));

      // If-Range with the Last-Modified date the first part came with: still the same bytes.
      const byDate = await fetch(await mint(), {
        headers: { range: 'bytes=100000-', 'if-range': part1.headers.get('last-modified') as string },
      });
      expect(byDate.status).toBe(206);
      expect(sha256(Buffer.concat([head, Buffer.from(await byDate.arrayBuffer())]))).toBe(sha256(original));

      // A stale validator: the partial copy is of other bytes, so the whole file comes back.
      const stale = await fetch(await mint(), {
        headers: { range: 'bytes=100000-', 'if-range': `"${'0'.repeat(64)}"` },
      });
      expect(stale.status).toBe(200);
      expect(stale.headers.get('content-range')).toBeNull();
      expect(sha256(Buffer.from(await stale.arrayBuffer()))).toBe(sha256(original));
    });

    it('a browser opening an old, used B link is sent back to A (303), which mints a fresh one', async () => {
      const link = await mint();
      const used = await fetch(link);
      expect(used.status).toBe(200);
      await used.arrayBuffer();

      const browser = await fetch(link, { headers: { accept: BROWSER_ACCEPT }, redirect: 'manual' });
      expect(browser.status).toBe(303);
      expect(browser.headers.get('location')).toBe(`${appOrigin}/files/${fileId}/download`);
      expect(browser.headers.get('referrer-policy')).toBe('no-referrer');
      await browser.body?.cancel();

      // Following it with the session: A answers 303 to a fresh B link, which downloads.
      const click = await user.fetch(new URL(browser.headers.get('location') as string).pathname);
      expect(click.status).toBe(303);
      const fresh = click.headers.get('location') as string;
      expect(fresh.startsWith(`${downloadOrigin}/d/`)).toBe(true);
      expect(fresh).not.toBe(link);
      const again = await fetch(fresh);
      expect(again.status).toBe(200);
      expect(sha256(Buffer.from(await again.arrayBuffer()))).toBe(sha256(original));
    });
  },
);
