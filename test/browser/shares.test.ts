import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { type Browser, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHROMIUM, CHROMIUM_ARGS } from '../support/chromium.ts';
import { skipUnless } from '../support/skip.ts';
import { type Stack, startStack } from '../support/stack.ts';

const FILE = { name: 'holiday plan.pdf', mimeType: 'application/pdf', buffer: randomBytes(120_000) };

const noChromium = skipUnless(
  'share links in Chromium',
  !existsSync(CHROMIUM) && `no Chromium at ${CHROMIUM} (apt-get install -y chromium)`,
);

// The owner creates a link from the file's row and copies it; a fresh browser context (no
// account, no cookies) opens it and downloads; the owner sees the download and revokes; the
// page then refuses.
describe.skipIf(noChromium.skip)(`share links in Chromium${noChromium.reason}`, { timeout: 90_000 }, () => {
  let stack: Stack;
  let browser: Browser;
  const problems: string[] = [];

  const watch = (page: Page) => {
    page.on('console', (message) => {
      if (message.type() === 'error') problems.push(message.text());
    });
    page.on('pageerror', (error) => problems.push(error.message));
    return page;
  };

  beforeAll(async () => {
    [stack, browser] = await Promise.all([
      startStack(),
      chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS }),
    ]);
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await stack?.stop();
  });

  it('create, copy, open in a fresh context, download, revoke, see the page refuse', async () => {
    const app = stack.appOrigin;
    const ownerContext = await browser.newContext({ acceptDownloads: true });
    await ownerContext.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: app });
    const owner = watch(await ownerContext.newPage());
    await owner.goto(`${app}/register`);
    await owner.getByLabel('Username').fill('sharer');
    await owner.getByLabel('Password').fill('correct horse battery');
    await owner.getByRole('button', { name: 'Create account' }).click();
    await owner.getByRole('heading', { name: 'Your files' }).waitFor();
    await owner.getByLabel(/Drop files here/).setInputFiles(FILE);
    await owner.getByRole('button', { name: 'Upload', exact: true }).click();
    const row = owner.getByRole('row', { name: new RegExp(FILE.name) });
    await row.waitFor();

    // Create: from the file's row, 1 day, at most 2 downloads, no password.
    await row.locator('summary', { hasText: 'Share' }).click();
    await row.getByLabel('Expires after').selectOption('86400');
    await row.getByLabel('Downloads allowed').fill('2');
    await row.getByRole('button', { name: 'Create link' }).click();
    await owner.getByRole('heading', { name: 'Share links' }).waitFor();
    expect(await owner.locator('.flash').textContent()).toContain(`${app}/s/`);

    // Copy.
    const shareRow = owner.locator('tr[data-share]');
    const link = (await shareRow.locator('input.share-url').inputValue()) as string;
    expect(link).toMatch(new RegExp(`^${app}/s/[A-Za-z0-9_-]{22}$`));
    await shareRow.getByRole('button', { name: 'Copy' }).click();
    await expect.poll(() => shareRow.getByRole('button', { name: /Cop/ }).textContent()).toBe('Copied');
    expect(await owner.evaluate('navigator.clipboard.readText()')).toBe(link);

    // A recipient: a fresh context, no account, no cookies.
    const recipientContext = await browser.newContext({ acceptDownloads: true });
    const recipient = watch(await recipientContext.newPage());
    await recipient.goto(link);
    await recipient.getByRole('heading', { name: FILE.name }).waitFor();
    expect(await recipient.locator('[data-downloads-left]').textContent()).toBe('2');
    const [download] = await Promise.all([
      recipient.waitForEvent('download'),
      recipient.getByRole('button', { name: 'Download' }).click(),
    ]);
    expect(download.suggestedFilename()).toBe(FILE.name);
    expect((await readFile(await download.path())).equals(FILE.buffer)).toBe(true);
    expect(await recipientContext.cookies()).toEqual([]);

    // The owner sees the download, then revokes.
    await owner.reload();
    expect(await shareRow.locator('[data-downloads]').textContent()).toBe('1 of 2');
    expect(await shareRow.locator('time').count()).toBe(2);
    await shareRow.getByRole('button', { name: /^Revoke/ }).click();
    expect(await owner.locator('.flash').textContent()).toContain('revoked');

    // Every page so far ran clean (no CSP violation, no script error).
    expect(problems).toEqual([]);

    // The recipient's page refuses at once (the browser logs the 404 itself).
    const refused = await recipient.goto(link);
    expect(refused?.status()).toBe(404);
    await recipient.getByRole('heading', { name: 'This link does not exist' }).waitFor();
    expect(await recipient.getByRole('button', { name: 'Download' }).count()).toBe(0);
  });
});
