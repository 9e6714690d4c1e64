/**
 * The range logic against RFC 9110 §14, property by property: every relation of first, last and
 * size (size 0 included), suffixes, and arbitrary headers. The route's own behaviour around it
 * (416 consumes nothing, HEAD, If-Range) is in download.test.ts.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseRange } from '../src/range.ts';

type Outcome = { start: number; end: number } | 'unsatisfiable' | undefined;

/**
 * RFC 9110 read as plainly as possible. §14.1.1: `first-last` with last < first is invalid (and an
 * invalid Range is ignored, §14.2). §14.1.2: an int-range is satisfiable iff first < size, a
 * suffix-range iff its length is non-zero; an unsatisfiable range is 416 (§15.5.17). §14.1.2 also
 * says a zero-length representation has no satisfiable int-range, and a suffix on it names no
 * byte, so the server ignores the header (§14.2 "MAY ignore").
 */
function rfc9110(first: number | undefined, last: number | undefined, size: number): Outcome {
  if (first === undefined) {
    if (last === undefined) return undefined; // "bytes=-" is not a range-spec
    if (last === 0) return 'unsatisfiable';
    if (size === 0) return undefined;
    const length = Math.min(last, size);
    return { start: size - length, end: size - 1 };
  }
  if (last !== undefined && last < first) return undefined;
  if (!(first < size)) return 'unsatisfiable';
  const end = last === undefined || last >= size ? size - 1 : last;
  return { start: first, end };
}

const header = (first: number | undefined, last: number | undefined) => `bytes=${first ?? ''}-${last ?? ''}`;

// Positions near the size make every relation (below, at, just past, far past) frequent.
const sized = fc.integer({ min: 0, max: 40 }).chain((size) => {
  const position = fc.oneof(
    fc.integer({ min: 0, max: size + 3 }),
    fc.constantFrom(0, Math.max(0, size - 1), size, size + 1),
    fc.nat({ max: Number.MAX_SAFE_INTEGER }),
  );
  return fc.tuple(
    fc.constant(size),
    fc.option(position, { nil: undefined }),
    fc.option(position, { nil: undefined }),
  );
});

describe('parseRange (RFC 9110 §14)', () => {
  it('agrees with the RFC for every relation of first, last and size', () => {
    fc.assert(
      fc.property(sized, ([size, first, last]) => {
        expect(parseRange(header(first, last), size)).toEqual(rfc9110(first, last, size));
      }),
      { numRuns: 5_000 },
    );
  });

  it('agrees with the RFC on large files too', () => {
    const big = fc.nat({ max: 2 ** 40 });
    fc.assert(
      fc.property(
        big,
        fc.option(big, { nil: undefined }),
        fc.option(big, { nil: undefined }),
        (size, first, last) => {
          expect(parseRange(header(first, last), size)).toEqual(rfc9110(first, last, size));
        },
      ),
    );
  });

  it('a range starting exactly at the end (curl -C -, wget -c on a complete file) is 416, size 0 included', () => {
    fc.assert(
      fc.property(fc.nat({ max: 2 ** 40 }), (size) => {
        expect(parseRange(`bytes=${size}-`, size)).toBe('unsatisfiable');
      }),
    );
  });

  it('whatever the header, the answer is ignore, 416, or a non-empty range inside the file', () => {
    const headers = fc.oneof(
      fc.string(),
      fc.stringMatching(/^bytes=[\d\-, ]{0,12}$/),
      fc.stringMatching(/^[a-z]{0,6}=\d{0,3}-\d{0,3}$/),
    );
    fc.assert(
      fc.property(headers, fc.nat({ max: 100 }), (value, size) => {
        const range = parseRange(value, size);
        if (range === undefined || range === 'unsatisfiable') return;
        expect(range.start).toBeGreaterThanOrEqual(0);
        expect(range.start).toBeLessThanOrEqual(range.end);
        expect(range.end).toBeLessThan(size);
      }),
      { numRuns: 2_000 },
    );
  });

  it('another unit, several ranges or a malformed spec is ignored (whole file)', () => {
    const spec = fc.tuple(
      fc.option(fc.nat(50), { nil: undefined }),
      fc.option(fc.nat(50), { nil: undefined }),
    );
    fc.assert(
      fc.property(fc.array(spec, { minLength: 2, maxLength: 5 }), fc.nat(50), (specs, size) => {
        const set = specs.map(([first, last]) => `${first ?? ''}-${last ?? ''}`).join(',');
        expect(parseRange(`bytes=${set}`, size)).toBeUndefined();
        expect(parseRange(`items=${specs[0]?.[0] ?? 0}-`, size)).toBeUndefined();
      }),
    );
    for (const value of ['bytes=abc', 'bytes=', 'bytes=-', 'bytes=1-2-3', '0-1', 'bytes=+1-2', 'bytes=0x1-'])
      expect(parseRange(value, 10), value).toBeUndefined();
  });
});
