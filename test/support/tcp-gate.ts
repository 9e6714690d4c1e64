import { connect, createServer, type Socket } from 'node:net';

/**
 * A TCP relay in front of a real service, to take it away from a server under test: `open`
 * relays, `down` cuts every connection and refuses new ones (reset), `stall` cuts nothing but
 * relays nothing either (a store that hangs).
 */
export interface TcpGate {
  port: number;
  set(mode: 'open' | 'down' | 'stall'): void;
  /** Bytes relayed from the service to its clients so far. */
  readonly bytesFromService: number;
  close(): Promise<void>;
}

export async function startTcpGate(targetPort: number): Promise<TcpGate> {
  let mode: 'open' | 'down' | 'stall' = 'open';
  let bytesFromService = 0;
  const pairs = new Set<[Socket, Socket]>();
  const server = createServer((client) => {
    if (mode === 'down') {
      client.resetAndDestroy();
      return;
    }
    const upstream = connect(targetPort, '127.0.0.1');
    const pair: [Socket, Socket] = [client, upstream];
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    upstream.on('data', (chunk: Buffer) => {
      bytesFromService += chunk.length;
    });
    if (mode === 'stall') client.pause();
    else {
      client.pipe(upstream);
      upstream.pipe(client);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    get bytesFromService() {
      return bytesFromService;
    },
    async close() {
      for (const [client, upstream] of pairs) {
        client.destroy();
        upstream.destroy();
      }
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
    set(next) {
      mode = next;
      for (const [client, upstream] of pairs) {
        if (next === 'down') {
          client.resetAndDestroy();
          upstream.destroy();
        } else if (next === 'stall') {
          client.unpipe(upstream);
          upstream.unpipe(client);
          client.pause();
          upstream.pause();
        }
      }
    },
  };
}
