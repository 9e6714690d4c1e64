/**
 * A browser's own Resume on the same B URL (README "One download per
 * token"): Chromium downloads a 24 MiB file from B (a real process) through a TCP relay that cuts
 * the first connection after 4 MiB, so the download is interrupted as by a network drop. Chromium
 * resumes it by itself on the same URL (`Range` + `If-Range`), and B sends the rest under the same
 * token. The file ends with the original's SHA-256, and B's bytes stay within the bound.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Browser, chromium } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHROMIUM, CHROMIUM_ARGS } from '../support/chromium.ts';
import { type B, startB } from '../support/download-server-alone.ts';
import { skipUnless } from '../support/skip.ts';

const MIB = 1024 * 1024;
const SIZE = 24 * MIB;
const CUT_AFTER = 4 * MIB;

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/**
 * A TCP relay to `port` that cuts the first connection to carry more than `cutAfter` bytes towards
 * the client (not simply the first connection: Chromium preconnects sockets it may never use).
 */
async function relay(port: number, cutAfter: number): Promise<{ server: Server; port: number }> {
  let cutDone = false;
  const server = createServer((client: Socket) => {
    const upstream = connect(port, '127.0.0.1');
    let sent = 0;
    client.pipe(upstream);
    upstream.on('data', (chunk: Buffer) => {
      sent += chunk.length;
      if (!cutDone && sent > cutAfter) {
        cutDone = true;
        client.destroy();
        upstream.destroy();
        return;
      }
      if (!client.write(chunk)) upstream.pause();
    });
    client.on('drain', () => upstream.resume());
    upstream.on('end', () => client.end());
    for (const socket of [client, upstream]) socket.on('error', () => {});
    client.on('close', () => upstream.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, port: (server.address() as { port: number }).port };
}

const noChromium = skipUnless(
  'Chromium resuming a download',
  !existsSync(CHROMIUM) && `no Chromium at ${CHROMIUM} (apt-get install -y chromium)`,
);
describe.skipIf(noChromium.skip)(
  `Chromium resumes a cut download on the same B URL${noChromium.reason}`,
  () => {
    let b: B;
    let browser: Browser;
    let downloads: string;
    let cutter: { server: Server; port: number };

    beforeAll(async () => {
      downloads = await mkdtemp(join(tmpdir(), 'sfh-browser-resume-'));
      b = await startB();
      cutter = await relay(Number(new URL(b.origin).port), CUT_AFTER);
      browser = await chromium.launch({
        executablePath: CHROMIUM,
        args: CHROMIUM_ARGS,
        downloadsPath: downloads,
      });
    }, 120_000);

    afterAll(async () => {
      await browser?.close();
      cutter?.server.close();
      await b?.stop();
      await rm(downloads, { recursive: true, force: true });
    });

    it('a download cut after 4 MiB is resumed on the same B URL: the same token sends the rest', async () => {
      const original = randomBytes(SIZE);
      const file = await b.put(original, 'big.bin');
      const path = new URL(b.url(await b.mint(file))).pathname;
      const context = await browser.newContext({ acceptDownloads: true });
      const page = await context.newPage();
      await page.setContent(`<a href="http://127.0.0.1:${cutter.port}${path}/big.bin">get</a>`);
      const [download] = await Promise.all([page.waitForEvent('download'), page.click('a')]);
      // Chromium resumes a download cut by a network error by itself (a strong ETag and
      // Accept-Ranges allow it): the same URL, `Range` from what it has, `If-Range` with the ETag.
      expect(await download.failure()).toBeNull();
      expect(sha256(await readFile(await download.path()))).toBe(sha256(original));
      const metrics = await (await fetch(`${b.origin}/metrics`)).text();
      expect(metrics).toMatch(/^download_requests_total\{result="aborted"\} 1$/m);
      expect(metrics).toMatch(/^download_requests_total\{result="partial"\} 1$/m);
      expect(metrics).not.toMatch(/^download_requests_total\{result="TOKEN_USED"\}/m);
      const sent = Number(/^download_bytes_sent_total (\S+)$/m.exec(metrics)?.[1]);
      expect(sent).toBeGreaterThan(SIZE);
      expect(sent).toBeLessThanOrEqual(SIZE + Math.min(SIZE, 8 * 16 * MIB) + 2 * 2048);
      console.info(
        `Chromium: cut after ${CUT_AFTER} bytes, resumed itself; B sent ${sent} bytes for a ${SIZE}-byte file`,
      );
      await context.close();
    }, 60_000);
  },
);
