/**
 * Hostile strings in everything a client controls on B (the token and name in the path, Range,
 * If-Range, Accept): every answer is a 4xx or a success, never a 5xx, and never a hang.
 */
import fc from 'fast-check';
import { expect, it } from 'vitest';
import { buildTestApp } from './helpers.ts';

const SPECIAL = [
  '\u0000',
  '\u0001',
  '\u007f',
  '\ud800',
  '\u202e',
  '%00',
  '%',
  '..',
  '/',
  '.',
  'eyJ',
  '=',
  ' ',
  '\t',
];
const hostile = fc
  .array(fc.oneof(fc.constantFrom(...SPECIAL), fc.string({ unit: 'binary', maxLength: 12 })), {
    maxLength: 10,
  })
  .map((pieces) => pieces.join(''));
const segment = (value: string) =>
  [...Buffer.from(value, 'utf8')].map((b) => `%${b.toString(16).padStart(2, '0')}`).join('') || 'x';
/** What a real HTTP parser lets through in a header value. */
const headerValue = fc.string({
  unit: fc
    .oneof(fc.integer({ min: 0x20, max: 0x7e }), fc.integer({ min: 0x80, max: 0xff }))
    .map((c) => String.fromCharCode(c)),
  maxLength: 60,
});

it('hostile tokens, names and headers get 4xx, never 5xx', async () => {
  const b = await buildTestApp();
  const file = await b.putFile('hostile');
  const good = await b.mint(file, { ttlSeconds: 600 });
  await fc.assert(
    fc.asyncProperty(
      hostile,
      hostile,
      headerValue,
      headerValue,
      headerValue,
      async (token, name, range, ifRange, accept) => {
        for (const url of [
          `/d/${segment(token)}`,
          `/d/${segment(token)}/${segment(name)}`,
          `/d/${good}/${segment(name)}`,
        ]) {
          const response = await b.app.inject({
            method: 'HEAD',
            url,
            headers: { range, 'if-range': ifRange, accept },
          });
          expect(response.statusCode, `${url} ${range}`).toBeLessThan(500);
        }
      },
    ),
    { numRuns: 200 },
  );
});
