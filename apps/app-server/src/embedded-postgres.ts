import { chmod, mkdir, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join, resolve } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { NodeFS } from '@electric-sql/pglite/nodefs';
import { isServing } from '@sfh/lifecycle';

export interface EmbeddedPostgres {
  /** A `pg` connection string for the Unix socket the database is served on. */
  url: string;
  close(): Promise<void>;
}

/**
 * Serves PGlite (WASM Postgres, data in `DATA_DIR/pg`) on a Unix socket in `DATA_DIR/run`, so A
 * talks to it through `pg` exactly as to a real Postgres (one data-access path), and the ops CLI
 * can reach the same database while A holds it open. The socket's folder is private to the user.
 */
export async function startEmbeddedPostgres(dataDir: string): Promise<EmbeddedPostgres> {
  const pgDir = resolve(dataDir, 'pg');
  const runDir = resolve(dataDir, 'run');
  const socketPath = join(runDir, '.s.PGSQL.5432');
  if (socketPath.length > 100) {
    throw new Error(`DATA_DIR is too deep for a Unix socket path (${socketPath}); choose a shorter DATA_DIR`);
  }
  await mkdir(pgDir, { recursive: true });
  await mkdir(runDir, { recursive: true, mode: 0o700 });
  await chmod(runDir, 0o700);
  if (await isServing(socketPath)) {
    throw new Error(
      `The embedded database in ${pgDir} is already in use by another process (an app server?)`,
    );
  }
  // A socket file left by a process that crashed.
  await rm(socketPath, { force: true });
  const db = await PGlite.create({ fs: new PrivateNodeFS(pgDir) });
  const wire = new WireServer(db);
  const server = createServer((socket) => wire.accept(socket));
  await new Promise<void>((done, fail) => server.once('error', fail).listen(socketPath, done));
  return {
    url: embeddedDatabaseUrl(dataDir),
    async close() {
      await closeServer(server, wire);
      await db.close();
    },
  };
}

/**
 * PGlite's data folder with every file it creates private to this user (0600), as a real
 * Postgres keeps its files. Emscripten's file system ignores the process's umask: it creates a
 * file, then chmods it to the mode Postgres asked for under Emscripten's own umask (022), or 0666
 * for the files of initdb; `pg_internal.init` came back 0644 after every start-up pass. The
 * database's files (a plain private signing key in the write-ahead log, without
 * KEY_ENCRYPTION_KEY) must stay unreadable to other local users whatever the folder's mode, so
 * every chmod through the mount keeps the owner's bits only.
 */
class PrivateNodeFS extends NodeFS {
  override async init(...[pg, opts]: Parameters<NodeFS['init']>) {
    const preRun = (mod: { FS: unknown }) => {
      const ops = (mod.FS as EmscriptenFS).filesystems.NODEFS.node_ops;
      const setattr = ops.setattr;
      ops.setattr = (node, attr) =>
        setattr(node, attr.mode === undefined ? attr : { ...attr, mode: attr.mode & ~0o077 });
    };
    return super.init(pg, { ...opts, preRun: [...(opts.preRun ?? []), preRun] });
  }
}

/** The part of Emscripten's FS that `PrivateNodeFS` reaches into (not in PGlite's types). */
interface EmscriptenFS {
  filesystems: {
    NODEFS: { node_ops: { setattr: (node: unknown, attr: { mode?: number }) => void } };
  };
}

/**
 * For the ops CLI: the embedded database of `dataDir` through the running A's socket, or, when
 * no A is running, served by this process for as long as it needs it.
 */
export async function openEmbeddedPostgres(dataDir: string): Promise<EmbeddedPostgres> {
  if (await isServing(join(resolve(dataDir, 'run'), '.s.PGSQL.5432'))) {
    return { url: embeddedDatabaseUrl(dataDir), close: async () => {} };
  }
  return startEmbeddedPostgres(dataDir);
}

function embeddedDatabaseUrl(dataDir: string): string {
  return `postgresql://postgres@localhost/postgres?host=${encodeURIComponent(resolve(dataDir, 'run'))}`;
}

async function closeServer(server: Server, wire: WireServer): Promise<void> {
  const closed = new Promise<void>((done) => server.close(() => done()));
  await wire.closeAll();
  await closed;
}

/** Postgres' own limit (MAX_STARTUP_PACKET_LENGTH). */
const MAX_STARTUP_LENGTH = 10_000;
const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const CANCEL_REQUEST = 80877102;
const READY_FOR_QUERY = 0x5a; // 'Z'
const TERMINATE = 0x58; // 'X'
const PARSE = 0x50; // 'P'
const BIND = 0x42; // 'B'
const DESCRIBE = 0x44; // 'D'
const CLOSE = 0x43; // 'C'
const STATEMENT = 0x53; // 'S', in Describe and Close
const IDLE = 0x49; // 'I'
const SYNC = Uint8Array.from([0x53, 0, 0, 0, 4]); // 'S', length 4

let connections = 0;

class Connection {
  buffer = Buffer.alloc(0);
  started = false;
  closed = false;
  readonly pending: Buffer[] = [];
  /** This connection's prepared statements, by the name the backend knows them under. */
  readonly statements = new Set<string>();
  /** Prefix of this connection's statement names in the shared backend. */
  readonly prefix = `c${++connections}_`;
  constructor(readonly socket: Socket) {}
}

/**
 * The message with its statement name (if it names one) in the connection's own namespace: the
 * backend is shared, but to each `pg` connection its prepared statements are its own, as with
 * a real server. Portals are left alone; they live only until the transaction ends.
 */
function scoped(conn: Connection, message: Buffer): Buffer {
  const type = message[0];
  let at: number;
  if (type === PARSE) at = 5;
  else if (type === BIND)
    at = message.indexOf(0, 5) + 1; // after the portal name
  else if ((type === DESCRIBE || type === CLOSE) && message[5] === STATEMENT) at = 6;
  else return message;
  const end = message.indexOf(0, at);
  if (end <= at) return message; // the unnamed statement
  const name = `${conn.prefix}${message.toString('utf8', at, end)}`;
  if (type === PARSE) conn.statements.add(name);
  if (type === CLOSE) conn.statements.delete(name);
  const renamed = Buffer.concat([message.subarray(0, at), Buffer.from(name), message.subarray(end)]);
  renamed.writeInt32BE(renamed.length - 1, 1);
  return renamed;
}

/**
 * The Postgres wire protocol between many `pg` connections and the one PGlite backend. A
 * connection has the backend to itself from its first message until Postgres reports it idle
 * (ReadyForQuery 'I'), so a statement's Parse/Bind/Execute/Sync and a whole transaction are
 * never interleaved with another connection's messages. (pglite-socket 0.2 protects only
 * explicit transactions and mixes up concurrent statements: electric-sql/pglite#1046.)
 */
class WireServer {
  readonly #db: PGlite;
  readonly #connections = new Set<Connection>();
  readonly #waiting: Connection[] = [];
  #owner: Connection | undefined;
  /** The loop feeding the backend, while it runs. */
  #running: Promise<void> | undefined;
  #closing = false;

  constructor(db: PGlite) {
    this.#db = db;
  }

  accept(socket: Socket): void {
    const conn = new Connection(socket);
    this.#connections.add(conn);
    socket.on('data', (chunk) => {
      conn.buffer = Buffer.concat([conn.buffer, chunk]);
      this.#split(conn);
      if (conn.pending.length > 0) this.#schedule(conn);
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      conn.closed = true;
      this.#connections.delete(conn);
      const index = this.#waiting.indexOf(conn);
      if (index >= 0) this.#waiting.splice(index, 1);
      // Its prepared statements go with it, in turn like everything sent to the backend.
      if (conn.statements.size > 0 && this.#owner !== conn) this.#waiting.push(conn);
      this.#run();
    });
  }

  /** Closes every connection and resolves once the backend is no longer in use. */
  async closeAll(): Promise<void> {
    this.#closing = true;
    for (const conn of this.#connections) conn.socket.destroy();
    await this.#running;
  }

  #split(conn: Connection): void {
    for (;;) {
      const { buffer } = conn;
      if (!conn.started) {
        if (buffer.length < 8) return;
        const length = buffer.readInt32BE(0);
        // A length below the header's own 8 bytes would never consume anything: this loop would
        // spin on it for good (8 bytes from any local user froze A). Postgres refuses those, and
        // startup packets over 10,000 bytes, by closing the connection; so does this.
        if (length < 8 || length > MAX_STARTUP_LENGTH) {
          conn.socket.destroy();
          return;
        }
        if (buffer.length < length) return;
        const code = buffer.readInt32BE(4);
        conn.buffer = buffer.subarray(length);
        if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
          conn.socket.write('N'); // no encryption on a private Unix socket
        } else if (code === CANCEL_REQUEST) {
          conn.socket.destroy();
          return;
        } else {
          conn.started = true;
          conn.pending.push(buffer.subarray(0, length));
        }
        continue;
      }
      if (buffer.length < 5) return;
      // The length counts itself (4 bytes): anything less is a broken or hostile client.
      if (buffer.readInt32BE(1) < 4) {
        conn.socket.destroy();
        return;
      }
      const length = 1 + buffer.readInt32BE(1);
      if (buffer.length < length) return;
      conn.buffer = buffer.subarray(length);
      if (buffer[0] === TERMINATE) {
        conn.socket.end();
        return;
      }
      conn.pending.push(buffer.subarray(0, length));
    }
  }

  #schedule(conn: Connection): void {
    if (conn !== this.#owner && !this.#waiting.includes(conn)) this.#waiting.push(conn);
    this.#run();
  }

  #run(): void {
    if (this.#running || this.#closing) return;
    this.#running = this.#feed()
      // Only cleaning up after a closed connection can fail here (statements get their errors
      // in their replies); the next message starts the loop again.
      .catch(() => {})
      .finally(() => {
        this.#running = undefined;
      });
  }

  async #feed(): Promise<void> {
    while (!this.#closing) {
      this.#owner ??= this.#waiting.shift();
      const conn = this.#owner;
      if (!conn) return;
      if (conn.closed) {
        await this.#abandon(conn);
        continue;
      }
      const message = conn.pending.shift();
      // The owner is mid-statement or mid-transaction: everyone else waits for its next message.
      if (!message) return;
      let reply: Uint8Array;
      try {
        reply = await this.#db.execProtocolRaw(scoped(conn, message));
      } catch {
        conn.socket.destroy();
        conn.closed = true;
        continue;
      }
      if (!conn.closed) conn.socket.write(reply);
      if (readyStatus(reply) === IDLE) {
        this.#owner = undefined;
        if (conn.pending.length > 0) this.#waiting.push(conn);
      }
    }
  }

  // A connection went away, maybe mid-statement or mid-transaction: end both and drop its
  // prepared statements, so the next connection starts from a clean backend.
  async #abandon(conn: Connection): Promise<void> {
    try {
      await this.#db.execProtocolRaw(SYNC);
      if (this.#db.isInTransaction()) await this.#db.exec('ROLLBACK');
      for (const name of conn.statements) await this.#db.exec(`DEALLOCATE "${name.replaceAll('"', '""')}"`);
      conn.statements.clear();
    } finally {
      this.#owner = undefined;
    }
  }
}

/** The transaction status of the last ReadyForQuery in a reply, if it has one. */
function readyStatus(reply: Uint8Array): number | undefined {
  const view = Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength);
  let status: number | undefined;
  for (let offset = 0; offset + 5 <= view.length; offset += 1 + view.readInt32BE(offset + 1)) {
    if (view[offset] === READY_FOR_QUERY) status = view[offset + 5];
  }
  return status;
}
