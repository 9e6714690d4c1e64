/** A Lua script, imported as its text (esbuild's text loader; a transform in vitest.config.ts). */
declare module '*.lua' {
  const script: string;
  export default script;
}
