/**
 * Server B alone, as a real process (README "Download server (B)", "Metrics"
 * and "Failure modes"): keys from a JWKS file, files in a local store the test writes, tokens minted here exactly
 * as A mints them. What only a real process shows: its log output, its metrics, its open file
 * descriptors, its socket timeouts, and files larger than 4 GiB.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import {
  lstat,
  mkdir,
  mkdtemp,
  open,
  readdir,
  rename,
  rm,
  symlink,
  truncate,
  writeFile,
} from 'node:fs/promises';
import { get, type IncomingMessage, request } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FileClaims } from '@sfh/download-token';
import { exportJWK, generateKeyPair } from 'jose';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { type B, startB } from '../support/download-server-alone.ts';
import { openFds } from '../support/process-stats.ts';
import { DOWNLOAD_SERVER, freePort, startServer } from '../support/processes.ts';

const KIB = 1024;
const MIB = 1024 * KIB;
const GIB = 1024 * MIB;

const HAS_STRACE = spawnSync('strace', ['-V']).status === 0;
const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until B has written `count` more request log lines than `before` (logs follow responses). */
async function logLines(b: B, before: number, count: number): Promise<void> {
  const deadline = Date.now() + 5_000;
  while (requestLines(b) < before + count && Date.now() < deadline) await sleep(50);
}
/** The first line of B's output that `matches`, waiting for it (B writes its log in batches). */
async function logLine(b: B, matches: (line: string) => boolean): Promise<string | undefined> {
  const deadline = Date.now() + 5_000;
  for (;;) {
    const line = b.server.output().split('\n').find(matches);
    if (line || Date.now() > deadline) return line;
    await sleep(50);
  }
}
const requestLines = (b: B) =>
  b.server
    .output()
    .split('\n')
    .filter((line) => line.includes('"req":')).length;

/** Prometheus text → the value of one series (exact name with labels), or undefined. */
function metric(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const space = line.lastIndexOf(' ');
    if (line.slice(0, space) === series) return Number(line.slice(space + 1));
  }
  return undefined;
}

/** GETs `url` with node:http, reads the first chunk of the body, then tears the connection down. */
function abortAfterFirstChunk(url: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = get(url, { agent: false }, (res) => {
      res.on('error', () => {});
      if (res.statusCode !== 200) {
        res.resume();
        reject(new Error(`${url} answered ${res.statusCode}`));
        return;
      }
      res.once('data', () => {
        req.destroy();
        resolve();
      });
    });
    req.on('error', reject);
  });
}

/** Resolves with the milliseconds from `start` until the socket closes. */
function closedAfter(socket: ReturnType<typeof connect>, start: number): Promise<number> {
  socket.on('data', () => {});
  socket.on('error', () => {});
  return once(socket, 'close').then(() => Date.now() - start);
}

describe('B as a real process: logs, metrics, descriptors, large files', () => {
  let b: B;

  beforeAll(async () => {
    b = await startB();
  }, 60_000);

  afterAll(async () => {
    await b?.stop();
  });

  it.skipIf(!HAS_STRACE && !process.env.CI)(
    'syncs the replay journal to disk (fdatasync) for a claim before the bytes go out',
    async () => {
      const file = await b.put(randomBytes(KIB));
      const token = await b.mint(file);
      // Every thread of B (the sync runs on libuv's pool), traced for fdatasync and fsync.
      const pid = b.server.child.pid as number;
      const tids = await readdir(`/proc/${pid}/task`);
      const strace = spawn(
        'strace',
        ['-f', '-e', 'trace=fdatasync,fsync', ...tids.flatMap((tid) => ['-p', tid])],
        {
          stdio: ['ignore', 'ignore', 'pipe'],
        },
      );
      let traced = '';
      strace.stderr.on('data', (chunk) => {
        traced += chunk;
      });
      try {
        await vi.waitFor(() => expect(traced).toMatch(/attached/), { timeout: 5_000 });
        const response = await fetch(b.url(token));
        expect(response.status).toBe(200);
        await response.arrayBuffer();
        await vi.waitFor(() => expect(traced).toMatch(/fdatasync\(\d+\)\s+= 0/), { timeout: 5_000 });
      } finally {
        strace.kill('SIGINT');
        await once(strace, 'exit');
      }
    },
  );

  it('never logs a token that arrives in another shape: encoded, after a double slash, anywhere in the path', async () => {
    const file = await b.put(randomBytes(KIB));
    const before = requestLines(b);
    const tokens = await Promise.all(Array.from({ length: 6 }, () => b.mint(file)));
    const [routed, encoded, doubleSlash, elsewhere, asName, inQuery] = tokens as [string, ...string[]];
    const percent = (text: string) => [...text].map((c) => `%${c.charCodeAt(0).toString(16)}`).join('');
    const paths = [
      `/%64/${routed}`, // the router decodes %64 to d: the download handler serves it
      `/d/${percent(encoded as string)}`,
      `//d/${doubleSlash}`,
      `/x/${elsewhere}`,
      `/d/not-a-token/${asName}`,
      `/nothing?t=${inQuery}`,
    ];
    for (const path of paths) {
      const response = await fetch(`${b.origin}${path}`, { headers: { accept: 'application/json' } });
      await response.body?.cancel();
    }
    await logLines(b, before, paths.length);
    const output = b.server.output();
    for (const token of tokens) {
      const signature = token.split('.')[2] as string;
      expect(output.includes(signature), `signature in output: ${output.slice(-2000)}`).toBe(false);
    }
  });

  it('never writes a token to its output; request lines carry /d/[token] and a reqId', async () => {
    const bytes = randomBytes(64 * KIB);
    const file = await b.put(bytes);
    const before = requestLines(b);

    const good = await b.mint(file);
    const ok = await fetch(b.url(good));
    expect(ok.status).toBe(200);
    expect(sha256(Buffer.from(await ok.arrayBuffer()))).toBe(file.sha256);

    const reuse = await fetch(b.url(good));
    expect(reuse.status).toBe(410);
    await reuse.body?.cancel();

    const expired = await b.mint(file, { now: new Date(Date.now() - 10 * 60_000) });
    const expiredRes = await fetch(b.url(expired), { headers: { accept: 'application/json' } });
    expect(expiredRes.status).toBe(403);
    expect(await expiredRes.json()).toMatchObject({ error: 'TOKEN_EXPIRED' });

    const malformed = 'a'.repeat(5000);
    b.tokens.push(malformed);
    const malformedRes = await fetch(b.url(malformed));
    expect(malformedRes.status).toBe(400);
    expect(await malformedRes.json()).toMatchObject({ error: 'TOKEN_MALFORMED' });

    const attacker = await generateKeyPair('EdDSA');
    const forged = await b.mint(file, { key: attacker.privateKey });
    const forgedRes = await fetch(b.url(forged));
    expect(forgedRes.status).toBe(403);
    expect(await forgedRes.json()).toMatchObject({ error: 'TOKEN_INVALID' });

    const headToken = await b.mint(file);
    const head = await fetch(b.url(headToken), { method: 'HEAD' });
    expect(head.status).toBe(200);

    const notFoundToken = await b.mint(file);
    const notFound = await fetch(`${b.url(notFoundToken)}/x/y`);
    expect(notFound.status).toBe(404);
    await notFound.body?.cancel();

    await logLines(b, before, 7);
    const output = b.server.output();
    for (const token of [good, expired, malformed, forged, headToken, notFoundToken]) {
      expect(output.includes(token), `token in output: ${token.slice(0, 40)}…`).toBe(false);
      const signature = token.split('.')[2];
      if (signature) expect(output.includes(signature), 'signature segment in output').toBe(false);
    }
    expect(output).toContain('/d/[token]');
    expect(output).toContain('/d/[token]/x/y');
    expect(output).toMatch(/"reqId":/);
    // One structured line per request, each with its request id.
    const lines = output
      .split('\n')
      .filter((line) => line.includes('"req":'))
      .map((line) => JSON.parse(line) as { reqId?: string; req?: { url?: string } });
    expect(lines.length).toBeGreaterThanOrEqual(7);
    for (const line of lines) expect(line.reqId).toBeTruthy();
  });

  it('/metrics reports downloads by result, rejections by reason, bytes sent and the key set', async () => {
    const res = await fetch(`${b.origin}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
    const text = await res.text();
    expect(metric(text, 'download_requests_total{result="ok"}')).toBeGreaterThanOrEqual(1);
    expect(metric(text, 'download_token_rejections_total{reason="used"}')).toBeGreaterThanOrEqual(1);
    expect(metric(text, 'download_token_rejections_total{reason="malformed"}')).toBeGreaterThanOrEqual(1);
    expect(metric(text, 'download_token_rejections_total{reason="expired"}')).toBeGreaterThanOrEqual(1);
    expect(metric(text, 'download_token_rejections_total{reason="invalid"}')).toBeGreaterThanOrEqual(1);
    expect(metric(text, 'download_bytes_sent_total')).toBeGreaterThanOrEqual(64 * KIB);
    expect(metric(text, 'jwks_keys')).toBe(1);
    expect(metric(text, 'jwks_usable')).toBe(1);
    const age = metric(text, 'jwks_age_seconds');
    expect(age).toBeDefined();
    expect(age).toBeGreaterThanOrEqual(0);
  });

  it('1,000 downloads aborted midway leave no open file descriptors behind', async () => {
    const pid = b.server.child.pid as number;
    const file = await b.put(randomBytes(4 * MIB));
    const tokens = await Promise.all(Array.from({ length: 1000 }, () => b.mint(file)));
    const baseline = await openFds(pid);

    // The peak while they run shows the count does see each connection's and file's descriptor,
    // so a leak of one per download could not hide.
    let peak = baseline;
    const sampler = setInterval(async () => {
      peak = Math.max(peak, await openFds(pid).catch(() => 0));
    }, 10);
    let next = 0;
    const worker = async () => {
      while (next < tokens.length) {
        const token = tokens[next++] as string;
        await abortAfterFirstChunk(b.url(token));
      }
    };
    await Promise.all(Array.from({ length: 20 }, worker)).finally(() => clearInterval(sampler));
    expect(peak).toBeGreaterThan(baseline + 5);

    let count = await openFds(pid);
    const deadline = Date.now() + 5_000;
    while (count > baseline + 5 && Date.now() < deadline) {
      await sleep(100);
      count = await openFds(pid);
    }
    expect(count, `open fds: ${baseline} before, ${count} after`).toBeLessThanOrEqual(baseline + 5);
    // B is still fine.
    expect((await fetch(`${b.origin}/healthz`)).status).toBe(200);
  }, 60_000);

  it('serves files above 4 GiB: HEAD with the full length, a Range at the very end', async () => {
    // A sparse 5 GiB object in the store's own layout: put a tiny file to learn the path, then
    // grow it and write a marker at 5 GiB.
    const marker = Buffer.from('0123456789');
    const size = 5 * GIB + marker.length;
    const tiny = await b.put(Buffer.from('x'));
    const path = join(b.storageDir, tiny.obj.slice(0, 2), tiny.obj);
    try {
      await truncate(path, size);
      const handle = await open(path, 'r+');
      await handle.write(marker, 0, marker.length, 5 * GIB);
      await handle.close();
      const file: FileClaims = { ...tiny, name: 'huge.iso', size, sha256: 'ab'.repeat(32) };

      const head = await fetch(b.url(await b.mint(file)), { method: 'HEAD' });
      expect(head.status).toBe(200);
      expect(head.headers.get('content-length')).toBe('5368709130');

      const tail = await fetch(b.url(await b.mint(file)), { headers: { range: `bytes=${5 * GIB}-` } });
      expect(tail.status).toBe(206);
      expect(tail.headers.get('content-range')).toBe('bytes 5368709120-5368709129/5368709130');
      expect(tail.headers.get('content-length')).toBe('10');
      expect(Buffer.from(await tail.arrayBuffer()).equals(marker)).toBe(true);

      const suffix = await fetch(b.url(await b.mint(file)), { headers: { range: 'bytes=-4' } });
      expect(suffix.status).toBe(206);
      expect(suffix.headers.get('content-range')).toBe('bytes 5368709126-5368709129/5368709130');
      expect(Buffer.from(await suffix.arrayBuffer()).toString()).toBe('6789');
    } finally {
      await b.store.delete(tiny.obj);
    }
  });

  it('no token it was shown appears anywhere in its output (after everything above)', async () => {
    await sleep(200);
    const output = b.server.output();
    expect(b.tokens.length).toBeGreaterThan(1000);
    const leaked = b.tokens.filter(
      (token) => output.includes(token) || output.includes(token.split('.')[2] ?? token),
    );
    expect(leaked).toEqual([]);
  });
});

describe('B as a real process: start-up, and its key set in the log', () => {
  let b: B;

  beforeAll(async () => {
    b = await startB();
  }, 60_000);

  afterAll(async () => {
    await b?.stop();
  });

  const logged = (msg: string) =>
    b.server
      .output()
      .split('\n')
      .filter((line) => line.includes(`"msg":"${msg}"`))
      .map((line) => JSON.parse(line) as Record<string, unknown>);

  it('a second B on the same DATA_DIR (memory store) refuses to start and says to use Redis', async () => {
    const port = await freePort();
    const second = startServer(
      DOWNLOAD_SERVER,
      {
        DATA_DIR: join(b.dir, 'data'),
        JWKS_FILE: b.jwksFile,
        APP_PUBLIC_URL: 'http://a.test',
        DOWNLOAD_PUBLIC_URL: `http://127.0.0.1:${port}`,
        DOWNLOAD_PORT: String(port),
      },
      `http://127.0.0.1:${port}/readyz`,
    );
    await expect(second).rejects.toThrow(
      /exited with 1:\n.*Another download server \(B\) uses the replay journal.*REDIS_URL/s,
    );
    // The first one is unaffected.
    expect((await fetch(`${b.origin}/readyz`)).status).toBe(200);
  });

  it('LOG_FORMAT=pretty: one readable line per request, tokens still redacted', async () => {
    const pretty = await startB({ LOG_FORMAT: 'pretty' });
    try {
      const file = await pretty.put(Buffer.from('pretty'));
      const token = await pretty.mint(file);
      expect((await fetch(pretty.url(token))).status).toBe(200);
      expect((await fetch(`${pretty.origin}/healthz`)).status).toBe(200);
      // B writes its log in batches (at the latest 100 ms later).
      const deadline = Date.now() + 5_000;
      while (!pretty.server.output().includes('GET /healthz 200') && Date.now() < deadline) await sleep(50);
      const lines = pretty.server.output().trim().split('\n');
      expect(lines.filter((line) => line.startsWith('{'))).toEqual([]);
      expect(lines.filter((line) => / \/(d|healthz)\b/.test(line))).toEqual([
        expect.stringMatching(/INFO \(download\/\d+\): GET \/d\/\[token\] 200 request completed/),
        expect.stringMatching(/INFO \(download\/\d+\): GET \/healthz 200 request completed/),
      ]);
      expect(pretty.server.output()).not.toContain(token.split('.')[2] as string);
    } finally {
      await pretty.stop();
    }
  });

  it('logs one line per request, a refusal with its code in it', async () => {
    expect((await fetch(`${b.origin}/d/not-a-token`)).status).toBe(400);
    expect((await fetch(`${b.origin}/no/such/path`)).status).toBe(404);
    const requestLines = () =>
      b.server
        .output()
        .split('\n')
        .filter((line) => line.startsWith('{') && line.includes('"reqId"'))
        .map((line) => JSON.parse(line) as { reqId: string; level: number; msg: string; code?: string });
    const deadline = Date.now() + 5_000;
    while (!requestLines().some((line) => line.code === 'NOT_FOUND') && Date.now() < deadline)
      await sleep(50);
    const lines = requestLines();
    expect(lines.filter((line) => line.code !== undefined)).toMatchObject([
      { level: 30, msg: 'request completed', code: 'TOKEN_MALFORMED', res: { statusCode: 400 } },
      { level: 30, msg: 'request completed', code: 'NOT_FOUND', res: { statusCode: 404 } },
    ]);
    expect(new Set(lines.map((line) => line.reqId)).size).toBe(lines.length);
  });

  it('logs its first key set, then every kid added and removed', async () => {
    expect(logged('key set read: B can verify tokens')).toMatchObject([{ kids: [b.kid] }]);
    const { publicKey } = await generateKeyPair('EdDSA');
    const jwk = { ...(await exportJWK(publicKey)), kid: 'k-next', alg: 'EdDSA', use: 'sig' };
    await writeFile(`${b.jwksFile}.tmp`, JSON.stringify({ keys: [jwk] }), { mode: 0o644 });
    await rename(`${b.jwksFile}.tmp`, b.jwksFile);
    const deadline = Date.now() + 5_000;
    while (logged('key set changed').length === 0 && Date.now() < deadline) await sleep(50);
    expect(logged('key set changed')).toMatchObject([{ added: ['k-next'], removed: [b.kid] }]);
    // Re-reading an unchanged set says nothing.
    b.server.child.kill('SIGHUP');
    await sleep(300);
    expect(logged('key set changed')).toHaveLength(1);
  });
});

describe('B as a real process: slowloris timeouts that spare slow downloads', () => {
  let b: B;
  let port: number;

  beforeAll(async () => {
    b = await startB({ REQUEST_TIMEOUT_SECONDS: '2', IDLE_TIMEOUT_SECONDS: '3' });
    port = Number(new URL(b.origin).port);
  }, 60_000);

  afterAll(async () => {
    await b?.stop();
  });

  it.concurrent('closes a connection whose request head never ends (REQUEST_TIMEOUT_SECONDS=2)', async ({
    expect,
  }) => {
    const socket = connect(port, '127.0.0.1');
    await once(socket, 'connect');
    const start = Date.now();
    const closed = closedAfter(socket, start);
    socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n');
    const elapsed = await Promise.race([closed, sleep(8_000).then(() => Number.POSITIVE_INFINITY)]);
    socket.destroy();
    expect(elapsed).toBeLessThan(8_000);
    // Closed by the head timeout, not at once for some other reason.
    expect(elapsed).toBeGreaterThanOrEqual(1_500);
  });

  it.concurrent('closes an idle connection that sends nothing', async ({ expect }) => {
    const socket = connect(port, '127.0.0.1');
    await once(socket, 'connect');
    const start = Date.now();
    const elapsed = await Promise.race([
      closedAfter(socket, start),
      sleep(8_000).then(() => Number.POSITIVE_INFINITY),
    ]);
    socket.destroy();
    expect(elapsed).toBeLessThan(8_000);
    expect(elapsed).toBeGreaterThanOrEqual(1_500);
  });

  // The file must outlast the socket buffers: on loopback the kernel takes a 2 MiB response
  // whole within milliseconds, B's response ends at once and no server timeout could cut it, so a
  // 2 MiB test would pass whatever the timeouts did. 16 MiB keeps B writing through the slow phase
  // (checked below against B's own log line).
  it.concurrent('does not cut a slow legitimate download (64 KiB every 500 ms for ~5 s)', async ({
    expect,
  }) => {
    const bytes = randomBytes(16 * MIB);
    const file = await b.put(bytes);
    const token = await b.mint(file);
    const started = Date.now();

    const { received, slowPhaseBytes } = await new Promise<{ received: Buffer; slowPhaseBytes: number }>(
      (resolve, reject) => {
        const req = request(`${b.url(token)}/slow.bin`, { agent: false }, (res: IncomingMessage) => {
          if (res.statusCode !== 200) return reject(new Error(`answered ${res.statusCode}`));
          const chunks: Buffer[] = [];
          let total = 0;
          let windowBytes = 0;
          let slowPhaseBytes = 0;
          let slow = true;
          res.on('data', (chunk: Buffer) => {
            chunks.push(chunk);
            total += chunk.length;
            if (!slow) return;
            windowBytes += chunk.length;
            if (windowBytes >= 64 * KIB) res.pause();
          });
          // Every 500 ms another 64 KiB; after ~5 s, the rest at full speed.
          const timer = setInterval(() => {
            if (Date.now() - started >= 5_000) {
              slow = false;
              slowPhaseBytes = total;
              clearInterval(timer);
            }
            windowBytes = 0;
            res.resume();
          }, 500);
          res.on('end', () => {
            clearInterval(timer);
            resolve({ received: Buffer.concat(chunks), slowPhaseBytes });
          });
          res.on('error', (error) => {
            clearInterval(timer);
            reject(error);
          });
          res.on('aborted', () => {
            clearInterval(timer);
            reject(new Error(`cut after ${total} bytes and ${Date.now() - started} ms`));
          });
        });
        req.on('error', reject);
        req.end();
      },
    );
    expect(Date.now() - started).toBeGreaterThanOrEqual(5_000);
    expect(slowPhaseBytes).toBeLessThan(bytes.length / 2);
    expect(received.length).toBe(bytes.length);
    expect(sha256(received)).toBe(sha256(bytes));

    // B itself was sending for longer than IDLE_TIMEOUT_SECONDS: its timeout had the chance to
    // cut this download, and did not.
    const line = await logLine(b, (text) => text.includes('/d/[token]/slow.bin'));
    expect(line).toBeDefined();
    const logged = JSON.parse(line as string) as { res: { statusCode: number }; responseTime: number };
    expect(logged.res.statusCode).toBe(200);
    expect(logged.responseTime).toBeGreaterThan(3_000);
  });

  it.concurrent('does cut a download that stalls longer than IDLE_TIMEOUT_SECONDS', async ({ expect }) => {
    // The other side of the slow download: the timeout is live on download sockets too.
    const bytes = randomBytes(16 * MIB);
    const file = await b.put(bytes);
    const token = await b.mint(file);
    const outcome = await new Promise<{ total: number; complete: boolean }>((resolve, reject) => {
      const req = request(`${b.url(token)}/stalled.bin`, { agent: false }, (res: IncomingMessage) => {
        if (res.statusCode !== 200) return reject(new Error(`answered ${res.statusCode}`));
        let total = 0;
        res.on('data', (chunk: Buffer) => {
          total += chunk.length;
        });
        res.once('data', () => res.pause());
        // Nothing read for 9 s, then drain whatever B left us. Node cuts a socket whose write is
        // stuck only on the second idle period (net.Socket#_onTimeout lets the first pass when
        // the write queue changed since the last write), so a stalled download goes after 2 × 3 s.
        setTimeout(() => res.resume(), 9_000);
        res.on('error', () => {});
        res.on('close', () => resolve({ total, complete: res.complete }));
      });
      req.on('error', () => {});
      req.end();
    });
    expect(outcome.complete).toBe(false);
    expect(outcome.total).toBeLessThan(bytes.length);
  });
});

describe('B as a real process: a replay journal it cannot read', () => {
  it('stops B at start, naming the file, and leaves the journal alone', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'sfh-e2e-journal-'));
    try {
      await mkdir(join(dataDir, 'replay'), { recursive: true });
      // Unreadable (ELOOP; root reads through any file mode). Read as empty, it used to be
      // rewritten, and every used token in it would have worked again.
      await symlink('claims.log', join(dataDir, 'replay', 'claims.log'));
      await expect(startB({ DATA_DIR: dataDir })).rejects.toThrow(
        /exited with 1[\s\S]*Cannot read the replay journal/,
      );
      expect((await lstat(join(dataDir, 'replay', 'claims.log'))).isSymbolicLink()).toBe(true);
    } finally {
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});
