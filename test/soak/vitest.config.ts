import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// `npm run test:soak`: the sustained-load run, kept out of `npm test` because it takes
// SOAK_SECONDS (default 60) plus start-up. Same global setup as the main suite (the PGlite template).
const SOAK_SECONDS = Number(process.env.SOAK_SECONDS ?? 60);

export default defineConfig({
  test: {
    root: fileURLToPath(new URL('../..', import.meta.url)),
    include: ['test/soak/**/*.test.ts'],
    globalSetup: ['test/support/global-setup.ts'],
    // soak.test.ts runs only when this is set, so the root config's `test/**/*.test.ts` cannot
    // start it by accident.
    env: { SFH_SOAK: '1' },
    testTimeout: (SOAK_SECONDS + 120) * 1000,
    hookTimeout: 120_000,
  },
});
