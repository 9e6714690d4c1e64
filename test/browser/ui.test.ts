import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Browser, type BrowserContext, chromium, type Download, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHROMIUM, CHROMIUM_ARGS } from '../support/chromium.ts';
import { skipUnless } from '../support/skip.ts';
import { type Stack, startStack } from '../support/stack.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const ARTIFACTS = join(ROOT, 'test/artifacts');
const README_SCREENSHOTS = join(ROOT, 'docs/screenshots');
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const MAX_UPLOAD_BYTES = 5_000_000;

const FIREFOX_ON_WINDOWS = 'Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0';

const ALICE = { username: 'alice', password: 'correct horse battery' };
const NEW_PASSWORD = 'staple battery horse correct';
const FILES = [
  { name: 'résumé été.txt', mimeType: 'text/plain', buffer: Buffer.from('Bonjour, été !\n'.repeat(300)) },
  { name: 'quarterly report.pdf', mimeType: 'application/pdf', buffer: randomBytes(180_000) },
];

// Steps build on each other (one user, her files and sessions), so the tests run in order.
const noChromium = skipUnless(
  'the web UI in Chromium',
  !existsSync(CHROMIUM) && `no Chromium at ${CHROMIUM} (apt-get install -y chromium)`,
);
describe.skipIf(noChromium.skip)(`the web UI in Chromium${noChromium.reason}`, { timeout: 90_000 }, () => {
  let stack: Stack;
  let app: string;
  let downloadOrigin: string;
  let browser: Browser;
  let main: BrowserContext;
  let page: Page;
  // Anything the CSP blocked, and script errors: every page must run clean.
  const problems: string[] = [];

  async function newContext(options: { userAgent?: string; javaScriptEnabled?: boolean } = {}) {
    const context = await browser.newContext({ viewport: DESKTOP, acceptDownloads: true, ...options });
    context.on('page', watch);
    return context;
  }

  function watch(watched: Page) {
    watched.on('console', (message) => {
      if (message.type() === 'error') problems.push(message.text());
    });
    watched.on('pageerror', (error) => problems.push(error.message));
  }

  async function signIn(target: Page, password = ALICE.password) {
    await target.goto(`${app}/login`);
    await target.getByLabel('Username').fill(ALICE.username);
    await target.getByLabel('Password').fill(password);
    await target.getByRole('button', { name: 'Sign in' }).click();
    await target.getByRole('heading', { name: 'Your files' }).waitFor();
  }

  const flash = (target: Page) => target.locator('.flash').textContent();

  async function shoot(target: Page, name: string) {
    // As a visitor first sees it: no hover or focus left over from the test's clicks.
    await target.reload();
    await target.mouse.move(0, 0);
    for (const [size, viewport] of [
      ['desktop', DESKTOP],
      ['phone', PHONE],
    ] as const) {
      await target.setViewportSize(viewport);
      await target.screenshot({ path: join(ARTIFACTS, `${name}-${size}.png`), fullPage: size === 'phone' });
    }
    await target.setViewportSize(DESKTOP);
  }

  async function bytesOf(download: Download): Promise<Buffer> {
    return readFile(await download.path());
  }

  beforeAll(async () => {
    await mkdir(ARTIFACTS, { recursive: true });
    [stack, browser] = await Promise.all([
      startStack({ appEnv: { MAX_UPLOAD_BYTES: String(MAX_UPLOAD_BYTES), LOG_LEVEL: 'info' } }),
      chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS }),
    ]);
    ({ appOrigin: app, downloadOrigin } = stack);
    main = await newContext();
    page = await main.newPage();
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await stack?.stop();
    // For a failed run: what A logged (one line per request and every refusal).
    if (stack) await writeFile(join(ARTIFACTS, 'ui-app-server.log'), stack.a.output());
  });

  it('registers, signs in, uploads two files through the page and lists them', async () => {
    await page.goto(`${app}/`);
    // Signed out: the file list sends the browser to sign in, and back afterwards.
    expect(new URL(page.url()).pathname).toBe('/login');
    expect(new URL(page.url()).searchParams.get('next')).toBe('/');
    await shoot(page, 'login');

    await page.getByRole('link', { name: 'Create an account' }).click();
    await page.getByLabel('Username').fill(ALICE.username);
    await page.getByLabel('Password').fill(ALICE.password);
    await page.getByRole('button', { name: 'Create account' }).click();
    await page.getByRole('heading', { name: 'Your files' }).waitFor();
    expect(await flash(page)).toContain('Welcome, alice');

    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    expect(await flash(page)).toContain('You have signed out');
    await signIn(page);
    expect(await page.locator('.empty').textContent()).toContain('No files yet');

    // With JavaScript: both files at once, each its own request to the JSON API with a progress bar.
    const uploads: string[] = [];
    page.on('request', (request) => {
      if (request.method() === 'POST') uploads.push(new URL(request.url()).pathname);
    });
    await page.getByLabel(/Drop files here/).setInputFiles(FILES);
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    for (const file of FILES) await page.getByRole('row', { name: new RegExp(file.name) }).waitFor();
    expect(uploads).toEqual(['/api/files', '/api/files']);

    const rows = await page.locator('table.files tbody tr').allInnerTexts();
    expect(rows).toHaveLength(2);
    expect(rows.join('\n')).toMatch(/résumé été\.txt\s+5\.1\skB\s+text\/plain/);
    expect(rows.join('\n')).toMatch(/quarterly report\.pdf\s+180\skB\s+application\/pdf/);

    // Sortable: by name A to Z, then by size (largest first).
    await page.getByRole('link', { name: /^Name/ }).click();
    await page.waitForURL(`${app}/?sort=name`);
    expect(await page.locator('table.files tbody th').allInnerTexts()).toEqual([
      'quarterly report.pdf',
      'résumé été.txt',
    ]);
    await page.getByRole('link', { name: /^Size/ }).click();
    await page.waitForURL(`${app}/?sort=-size`);
    expect(await page.locator('table.files tbody th').allInnerTexts()).toEqual([
      'quarterly report.pdf',
      'résumé été.txt',
    ]);
    expect(await page.locator('th[aria-sort]').getAttribute('aria-sort')).toBe('descending');
  });

  it('downloads each file through its Download button: original name and bytes', async () => {
    await page.goto(`${app}/`);
    for (const file of FILES) {
      const row = page.getByRole('row', { name: new RegExp(file.name) });
      const [download] = await Promise.all([
        page.waitForEvent('download'),
        row.getByRole('link', { name: /^Download/ }).click(),
      ]);
      expect(download.suggestedFilename()).toBe(file.name);
      expect((await bytesOf(download)).equals(file.buffer)).toBe(true);
      expect(download.url().startsWith(`${downloadOrigin}/d/`)).toBe(true);
    }
    await shoot(page, 'files');
  });

  it('a used B URL opened again is refused, and the browser is sent back for a fresh one', async () => {
    await page.goto(`${app}/`);
    const file = FILES[0] as (typeof FILES)[number];
    const [first] = await Promise.all([
      page.waitForEvent('download'),
      page
        .getByRole('row', { name: new RegExp(file.name) })
        .getByRole('link', { name: /^Download/ })
        .click(),
    ]);
    await first.path();
    const used = first.url();

    // An API client hears why, and where to renew.
    const api = await fetch(used, { headers: { accept: 'application/json' } });
    expect(api.status).toBe(410);
    const body = (await api.json()) as { error: string; renewUrl: string };
    expect(body.error).toBe('TOKEN_USED');
    const fileId = new URL(body.renewUrl).pathname.split('/')[2];
    expect(body.renewUrl).toBe(`${app}/files/${fileId}/download`);

    // The browser: B refuses the token with a 303 to A's download link, which mints a fresh
    // token, so the visit ends in a working download.
    const refused = page.waitForResponse((response) => response.url() === used);
    const again = page.waitForEvent('download');
    await page.goto(used).catch(() => {
      // A navigation that turns into a download is reported as aborted.
    });
    const response = await refused;
    expect(response.status()).toBe(303);
    expect(response.headers().location).toBe(body.renewUrl);
    const second = await again;
    expect(second.url()).not.toBe(used);
    expect(second.suggestedFilename()).toBe(file.name);
    expect((await bytesOf(second)).equals(file.buffer)).toBe(true);
  });

  it('ending a session from the sessions page signs that browser out on its next click', async () => {
    const other = await newContext({ userAgent: FIREFOX_ON_WINDOWS });
    const otherPage = await other.newPage();
    await signIn(otherPage);

    await page.goto(`${app}/sessions`);
    const row = page.getByRole('row', { name: /Firefox 128 on Windows/ });
    expect(await row.textContent()).toContain('127.0.0.1');
    expect(await page.getByRole('row', { name: /This browser/ }).count()).toBe(1);
    await shoot(page, 'sessions');

    await row.getByRole('button', { name: /^End/ }).click();
    await page.locator('.flash').waitFor();
    expect(await flash(page)).toContain('That session has ended');
    expect(await page.getByRole('row', { name: /Firefox/ }).count()).toBe(0);

    await otherPage.getByRole('link', { name: 'Sessions' }).click();
    await otherPage.waitForURL(/\/login\?next=%2Fsessions&ended=1$/);
    expect(await flash(otherPage)).toContain('Your session has ended');
    expect(await otherPage.content()).not.toContain('résumé');
    await other.close();
  });

  it('changing the password signs the other browsers out, and only the new password works', async () => {
    const other = await newContext();
    const otherPage = await other.newPage();
    await signIn(otherPage);

    await page.goto(`${app}/password`);
    await page.getByLabel('Current password').fill(ALICE.password);
    await page.getByLabel('New password', { exact: true }).fill(NEW_PASSWORD);
    await page.getByLabel('Repeat the new password').fill(NEW_PASSWORD);
    await page.getByRole('button', { name: 'Change password' }).click();
    await page.getByRole('heading', { name: 'Your files' }).waitFor();
    expect(await flash(page)).toContain('Your password has changed');

    // The other browser is signed out; a click on a download link now asks it to sign in.
    await otherPage
      .getByRole('row', { name: /quarterly/ })
      .getByRole('link', { name: /^Download/ })
      .click();
    await otherPage.waitForURL(/\/login\?next=/);
    expect(await flash(otherPage)).toContain('Your session has ended');

    await otherPage.getByLabel('Username').fill(ALICE.username);
    await otherPage.getByLabel('Password').fill(ALICE.password);
    await otherPage.getByRole('button', { name: 'Sign in' }).click();
    await otherPage.locator('.flash').waitFor();
    expect(await flash(otherPage)).toContain('Wrong username or password');
    // The form keeps the username and where to go afterwards: the download continues.
    expect(await otherPage.getByLabel('Username').inputValue()).toBe(ALICE.username);
    await otherPage.getByLabel('Password').fill(NEW_PASSWORD);
    const [download] = await Promise.all([
      otherPage.waitForEvent('download'),
      otherPage.getByRole('button', { name: 'Sign in' }).click(),
    ]);
    expect(download.suggestedFilename()).toBe('quarterly report.pdf');
    await other.close();
  });

  it('tells the user about taken usernames, throttled sign-in and files over the limit', async () => {
    const visitor = await newContext();
    const visitorPage = await visitor.newPage();
    await visitorPage.goto(`${app}/register`);
    await visitorPage.getByLabel('Username').fill('ALICE');
    await visitorPage.getByLabel('Password').fill('another long password');
    await visitorPage.getByRole('button', { name: 'Create account' }).click();
    await visitorPage.locator('.flash').waitFor();
    expect(await flash(visitorPage)).toContain('That username is taken');

    await visitorPage.goto(`${app}/login`);
    for (let attempt = 1; attempt <= 6; attempt += 1) {
      await visitorPage.getByLabel('Username').fill('mallory');
      await visitorPage.getByLabel('Password').fill(`guess number ${attempt}`);
      await visitorPage.getByRole('button', { name: 'Sign in' }).click();
      await visitorPage.locator('.flash').waitFor();
      const text = await flash(visitorPage);
      if (attempt <= 5) expect(text).toContain('Wrong username or password');
      else expect(text).toMatch(/Too many failed sign-in attempts\. Try again in 15 minutes\./);
    }
    await visitor.close();

    await page.goto(`${app}/`);
    await page.getByLabel(/Drop files here/).setInputFiles([
      {
        name: 'huge.bin',
        mimeType: 'application/octet-stream',
        buffer: Buffer.alloc(MAX_UPLOAD_BYTES + 1),
      },
    ]);
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await page.locator('#upload-progress .failed').waitFor();
    expect(await page.locator('#upload-progress').textContent()).toContain(
      'Larger than the 5.0\u00a0MB limit',
    );
  });

  it('after signing out, going back in history shows nothing private', async () => {
    await page.goto(`${app}/`);
    expect(await page.content()).toContain('quarterly report.pdf');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.waitForURL(`${app}/login`);
    await page.goBack();
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    const html = await page.content();
    for (const file of FILES) expect(html).not.toContain(file.name);
    expect(html).not.toContain('Signed in as');
  });

  it('works without JavaScript: upload one file, delete it after confirming, sign out', async () => {
    const noScript = await newContext({ javaScriptEnabled: false });
    const plain = await noScript.newPage();
    await plain.goto(`${app}/register`);
    await plain.getByLabel('Username').fill('bob');
    await plain.getByLabel('Password').fill('correct horse battery');
    await plain.getByRole('button', { name: 'Create account' }).click();
    await plain.getByRole('heading', { name: 'Your files' }).waitFor();

    await plain.getByLabel('Choose a file').setInputFiles({
      name: 'notes ñ.txt',
      mimeType: 'text/plain',
      buffer: Buffer.from('plain old form post'),
    });
    await plain.getByRole('button', { name: 'Upload', exact: true }).click();
    await plain.locator('.flash').waitFor();
    expect(await flash(plain)).toContain('Uploaded “notes ñ.txt”');
    const row = plain.getByRole('row', { name: /notes ñ\.txt/ });
    const [download] = await Promise.all([
      plain.waitForEvent('download'),
      row.getByRole('link', { name: /^Download/ }).click(),
    ]);
    expect((await bytesOf(download)).toString()).toBe('plain old form post');

    // Refused by the server (no script checks it first): the page says why.
    await plain.getByLabel('Choose a file').setInputFiles({
      name: 'too big.bin',
      mimeType: 'application/octet-stream',
      buffer: Buffer.alloc(MAX_UPLOAD_BYTES + 1),
    });
    await plain.getByRole('button', { name: 'Upload', exact: true }).click();
    await plain.waitForURL(`${app}/`);
    await plain.locator('.flash-error').waitFor();
    expect(await flash(plain)).toContain('larger than the upload limit of 5.0\u00a0MB');

    await row.locator('summary', { hasText: 'Delete' }).click();
    await row.getByRole('button', { name: 'Yes, delete it' }).click();
    await plain.locator('.flash').waitFor();
    expect(await flash(plain)).toContain('Deleted “notes ñ.txt”');
    expect(await plain.locator('.empty').textContent()).toContain('No files yet');

    await plain.getByRole('button', { name: 'Sign out' }).click();
    await plain.waitForURL(`${app}/login`);

    // Only paths on A are honoured after signing in: no open redirect.
    for (const next of ['//evil.example/', 'https://evil.example/', '/\\evil.example/']) {
      await plain.goto(`${app}/login?next=${encodeURIComponent(next)}`);
      await plain.getByLabel('Username').fill('bob');
      await plain.getByLabel('Password').fill('correct horse battery');
      await plain.getByRole('button', { name: 'Sign in' }).click();
      await plain.waitForURL(`${app}/`);
      await plain.getByRole('button', { name: 'Sign out' }).click();
      await plain.waitForURL(`${app}/login`);
    }
    await noScript.close();
  });

  it('ran every page without a CSP violation or a script error', async () => {
    expect(problems).toEqual([]);
    // The README shows these two; `UPDATE_SCREENSHOTS=1 npm test` refreshes them.
    if (process.env.UPDATE_SCREENSHOTS) {
      await mkdir(README_SCREENSHOTS, { recursive: true });
      await copyFile(join(ARTIFACTS, 'files-desktop.png'), join(README_SCREENSHOTS, 'files-desktop.png'));
      await copyFile(join(ARTIFACTS, 'files-phone.png'), join(README_SCREENSHOTS, 'files-phone.png'));
    }
  });
});
