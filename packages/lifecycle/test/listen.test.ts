import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, UNIX_SOCKET_PEER } from '@sfh/config';
import Fastify from 'fastify';
import { expect, it, onTestFinished } from 'vitest';
import { isServing, listen } from '../src/index.ts';

async function folder(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'sfh-listen-'));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function app() {
  const app = Fastify();
  app.get('/peer', async (request) => ({ ip: request.ip }));
  app.get('/slow', async () => {
    await new Promise((resolve) => setTimeout(resolve, 300));
    return 'done';
  });
  onTestFinished(() => app.close());
  return app;
}

it('serves the same app on the socket (peer 0.0.0.0) and the port; close stops both and removes the socket', async () => {
  const socketPath = join(await folder(), 'run', 'app.sock');
  const server = app();
  await listen(server, { port: 0, host: '127.0.0.1', socketPath });
  expect((await stat(join(socketPath, '..'))).mode & 0o777).toBe(0o700);
  const body = await new Promise<string>((resolve, reject) => {
    request({ socketPath, path: '/peer' }, (response) => {
      let text = '';
      response.on('data', (chunk) => {
        text += chunk;
      });
      response.on('end', () => resolve(text));
    })
      .on('error', reject)
      .end();
  });
  expect(JSON.parse(body)).toEqual({ ip: UNIX_SOCKET_PEER });
  expect((await server.inject('/peer')).statusCode).toBe(200);
  await server.close();
  expect(await isServing(socketPath)).toBe(false);
  await expect(stat(socketPath)).rejects.toThrow(/ENOENT/);
});

it('a drain lets a request in flight on the socket finish, and takes no new connection there', async () => {
  const socketPath = join(await folder(), 'run', 'app.sock');
  const server = app();
  await listen(server, { port: 0, host: '127.0.0.1', socketPath });
  const inFlight = new Promise<{ status: number; body: string }>((resolve, reject) => {
    request({ socketPath, path: '/slow' }, (response) => {
      let body = '';
      response.on('data', (chunk) => {
        body += chunk;
      });
      response.on('end', () => resolve({ status: response.statusCode as number, body }));
    })
      .on('error', reject)
      .end();
  });
  await new Promise((resolve) => setTimeout(resolve, 100));
  const closed = server.close();
  await new Promise((resolve) => setTimeout(resolve, 50)); // the drain has begun; /slow still runs
  expect(await isServing(socketPath)).toBe(false);
  expect(await inFlight).toEqual({ status: 200, body: 'done' });
  await closed;
});

it('refuses a folder others can enter, and a path that is not a socket (which it leaves alone)', async () => {
  const dir = await folder();
  await mkdir(join(dir, 'open'));
  await chmod(join(dir, 'open'), 0o751);
  await expect(
    listen(app(), { port: 0, host: '127.0.0.1', socketPath: join(dir, 'open', 'a.sock') }),
  ).rejects.toThrow(ConfigError);
  await mkdir(join(dir, 'closed'), { mode: 0o700 });
  const precious = join(dir, 'closed', 'session-secret');
  await writeFile(precious, 'keep me');
  await expect(listen(app(), { port: 0, host: '127.0.0.1', socketPath: precious })).rejects.toThrow(
    /exists and is not a socket/,
  );
  expect(await readFile(precious, 'utf8')).toBe('keep me');
});
