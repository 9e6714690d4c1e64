import { closeOnSignals, makePrivate, runMain } from '@sfh/lifecycle';
import { buildApp } from './app.ts';
import { loadConfig } from './config.ts';

runMain(async () => {
  const config = loadConfig(process.env);
  // The replay journal lives here: other local users must not read or rewrite it. The storage
  // is A's (B only reads it, often from a read-only mount): A sees to its modes.
  await makePrivate(config.DATA_DIR, { skip: [config.storageDir] });
  const app = await buildApp(config);
  closeOnSignals(app, config.SHUTDOWN_GRACE_SECONDS);
  // An operator's "reload the keys now", e.g. right after an emergency revocation.
  process.on('SIGHUP', () => {
    app.log.info('SIGHUP: reading the key set');
    void app.keys.refresh();
  });
  await app.listen({ port: config.DOWNLOAD_PORT, host: config.HOST });
  app.log.info(
    { keys: config.jwksSource, storage: config.storageDir },
    `download server (B) ready at ${config.DOWNLOAD_PUBLIC_URL}`,
  );
});
