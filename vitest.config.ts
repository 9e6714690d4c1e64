import { defineConfig } from 'vitest/config';

export default defineConfig({
  // B's Lua scripts are imported as text, as esbuild's text loader bundles them.
  plugins: [
    {
      name: 'lua-as-text',
      transform: (code, id) => (id.endsWith('.lua') ? `export default ${JSON.stringify(code)};` : undefined),
    },
  ],
  test: {
    include: ['packages/*/test/**/*.test.ts', 'apps/*/test/**/*.test.ts', 'test/**/*.test.ts'],
    exclude: ['**/node_modules/**', 'test/bench/**', 'test/soak/**'],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    globalSetup: ['test/support/global-setup.ts'],
  },
});
