import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { connect, type Socket } from 'node:net';
import { expect, it, onTestFinished } from 'vitest';
import { buildTestApp, useTestDatabase } from './helpers.ts';

// Slowloris against A over a real socket: a client that trickles its request is cut off, as on B.

const db = useTestDatabase();

/** Opens a connection to A, writes `head`, then one more byte every 200 ms until it closes. */
async function trickle(
  port: number,
  head: string,
): Promise<{ socket: Socket; closedAfterMs: Promise<number> }> {
  const socket = opened(port);
  await once(socket, 'connect');
  const start = Date.now();
  socket.write(head);
  const timer = setInterval(() => socket.write('a'), 200);
  socket.resume();
  const closedAfterMs = closed(socket).then(() => {
    clearInterval(timer);
    return Date.now() - start;
  });
  return { socket, closedAfterMs };
}

/** A client socket, destroyed when the test ends (so that A can close). */
function opened(port: number): Socket {
  const socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  onTestFinished(() => {
    socket.destroy();
  });
  return socket;
}

const closed = (socket: Socket) => new Promise<void>((resolve) => socket.once('close', () => resolve()));

async function listening(env: Record<string, string>) {
  const { app } = await buildTestApp(db(), env);
  await app.listen({ port: 0, host: '127.0.0.1' });
  return (app.server.address() as AddressInfo).port;
}

/** `promise`'s value, or `undefined` if it takes longer than `ms`. */
const within = <T>(promise: Promise<T>, ms: number) =>
  Promise.race([promise, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), ms))]);

it('closes a form post whose body trickles in past REQUEST_TIMEOUT_SECONDS', async () => {
  const port = await listening({ REQUEST_TIMEOUT_SECONDS: '1', IDLE_TIMEOUT_SECONDS: '60' });
  const { closedAfterMs } = await trickle(
    port,
    'POST /login HTTP/1.1\r\nHost: a.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\nusername=',
  );
  const ms = await within(closedAfterMs, 5_000);
  expect(ms, 'the connection was still open after 5 s').toBeDefined();
  expect(ms).toBeGreaterThanOrEqual(900);
});

it('closes a request head that trickles in past REQUEST_TIMEOUT_SECONDS', async () => {
  const port = await listening({ REQUEST_TIMEOUT_SECONDS: '1', IDLE_TIMEOUT_SECONDS: '60' });
  const { closedAfterMs } = await trickle(port, 'GET /healthz HTTP/1.1\r\nHost: a.test\r\nX-Slow: ');
  expect(await within(closedAfterMs, 5_000), 'the connection was still open after 5 s').toBeDefined();
});

it('closes an upload past UPLOAD_TIMEOUT_SECONDS, and an idle connection past IDLE_TIMEOUT_SECONDS', async () => {
  const port = await listening({ UPLOAD_TIMEOUT_SECONDS: '2', IDLE_TIMEOUT_SECONDS: '1' });
  const upload = await trickle(
    port,
    'POST /api/files HTTP/1.1\r\nHost: a.test\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000\r\n\r\n--b\r\n',
  );
  const uploadMs = await within(upload.closedAfterMs, 6_000);
  expect(uploadMs, 'the upload was still open after 6 s').toBeDefined();
  expect(uploadMs).toBeGreaterThanOrEqual(1_900);

  const idle = connect(port, '127.0.0.1');
  idle.on('error', () => {});
  await once(idle, 'connect');
  expect(
    await within(once(idle, 'close'), 4_000),
    'the idle connection was still open after 4 s',
  ).toBeDefined();
});
