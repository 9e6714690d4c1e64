import { setTimeout as sleep } from 'node:timers/promises';
import { announceReady, closeOnSignals, listen, makePrivate, runMain } from '@sfh/lifecycle';
import pino from 'pino';
import { buildApp } from './app.ts';
import { loadConfig } from './config.ts';

// One log line per request stays, but a write(2) per line cost B about a tenth of its
// small-file throughput: lines are gathered up to 4 KiB and written together, at the latest
// 100 ms after they were logged, and whatever is left when the process exits.
const LOG_BUFFER_BYTES = 4096;
const LOG_FLUSH_MS = 100;

runMain(async () => {
  const config = loadConfig(process.env);
  // The replay journal lives here: other local users must not read or rewrite it. The storage
  // is A's (B only reads it, often from a read-only mount): A sees to its modes.
  await makePrivate(config.DATA_DIR, { skip: [config.storageDir] });
  const logStream = pino.destination({
    dest: 1,
    sync: true,
    minLength: LOG_BUFFER_BYTES,
    periodicFlush: LOG_FLUSH_MS,
  });
  process.on('exit', () => logStream.flushSync());
  const app = await buildApp(config, { logStream });
  closeOnSignals(app, config.SHUTDOWN_GRACE_SECONDS);
  // An operator's "reload the keys now", e.g. right after an emergency revocation.
  process.on('SIGHUP', () => {
    app.log.info('SIGHUP: reading the key set');
    void app.keys.refresh();
  });
  await listen(app, {
    port: config.DOWNLOAD_PORT,
    host: config.HOST,
    socketPath: config.DOWNLOAD_SOCKET_PATH,
  });
  // Ready means what /readyz means: B can verify tokens (it has keys) and remember them (the
  // replay store answers). Until then it only listens, and answers 503.
  if (!app.keys.status().usable)
    app.log.info({ keys: config.jwksSource }, 'download server (B) listening, not ready: waiting for keys');
  await app.keys.ready;
  while (
    !(await app.replayStore.ping().then(
      () => true,
      () => false,
    ))
  )
    await sleep(1_000);
  announceReady(app, 'download server (B)', config.DOWNLOAD_PUBLIC_URL, {
    keys: config.jwksSource,
    storage: config.s3 ? `s3://${config.s3.bucket}/${config.s3.prefix}` : config.storageDir,
  });
});
