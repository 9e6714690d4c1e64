import { chmod, mkdir, mkdtemp, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it, onTestFinished } from 'vitest';
import { makePrivate } from '../src/index.ts';

const mode = async (path: string) => ((await stat(path)).mode & 0o777).toString(8);
const umask = process.umask();
afterEach(() => {
  process.umask(umask);
});

it('makes folders 0700 and files 0600, leaves skipped folders and link targets alone', async () => {
  const root = await mkdtemp(join(tmpdir(), 'sfh-private-'));
  onTestFinished(() => rm(root, { recursive: true, force: true }));
  const dir = join(root, 'data');
  await mkdir(join(dir, 'pg', 'base'), { recursive: true });
  await mkdir(join(dir, 'files'));
  await writeFile(join(dir, 'pg', 'base', '1'), 'x');
  await writeFile(join(dir, 'files', 'object'), 'x');
  await writeFile(join(root, 'outside'), 'x');
  await symlink(join(root, 'outside'), join(dir, 'link'));
  for (const path of [dir, join(dir, 'pg'), join(dir, 'pg', 'base'), join(dir, 'files')])
    await chmod(path, 0o755);
  for (const path of [join(dir, 'pg', 'base', '1'), join(dir, 'files', 'object'), join(root, 'outside')])
    await chmod(path, 0o644);

  await makePrivate(dir, { skip: [join(dir, 'files')] });

  expect(await mode(dir)).toBe('700');
  expect(await mode(join(dir, 'pg'))).toBe('700');
  expect(await mode(join(dir, 'pg', 'base'))).toBe('700');
  expect(await mode(join(dir, 'pg', 'base', '1'))).toBe('600');
  expect(await mode(join(dir, 'files'))).toBe('755');
  expect(await mode(join(dir, 'files', 'object'))).toBe('644');
  expect(await mode(join(root, 'outside'))).toBe('644');
  // And what the process creates from now on is private too.
  await writeFile(join(dir, 'new'), 'x');
  expect(await mode(join(dir, 'new'))).toBe('600');
});
