import type { ByteRange } from '@sfh/storage';

/**
 * The one `bytes` range of a `Range` header, by RFC 9110 §14: `undefined` means "send the whole
 * file" (200), `'unsatisfiable'` means 416 with `Content-Range: bytes *\/size`.
 *
 * - A header that is invalid (including `last < first`), of another unit, or that asks for several
 *   ranges is ignored: whole file, never multipart, so thousands of tiny ranges cannot multiply
 *   the response.
 * - `first-last` and `first-` are satisfiable when `first < size`; the end is clamped to the file.
 *   So a range starting exactly at the end (what `curl -C -` and `wget -c` send for a complete
 *   file) and `bytes=0-` on an empty file are 416, and consume nothing.
 * - `-N` (the last N bytes) is satisfiable when N > 0; N longer than the file means all of it. On
 *   an empty file it is satisfiable but has no byte to name in a `Content-Range`, so it is ignored
 *   (200 with the empty file), which §14.2 allows.
 *
 * range-parser answers 416 for malformed headers, hence this.
 */
export function parseRange(header: string, size: number): ByteRange | 'unsatisfiable' | undefined {
  const match = /^bytes=(\d*)-(\d*)$/.exec(header);
  if (!match) return undefined;
  const [, first = '', last = ''] = match;
  if (first === '') {
    if (last === '') return undefined;
    const suffix = Number(last);
    if (suffix === 0) return 'unsatisfiable';
    if (size === 0) return undefined;
    return { start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(first);
  if (last !== '' && Number(last) < start) return undefined;
  if (start >= size) return 'unsatisfiable';
  return { start, end: last === '' ? size - 1 : Math.min(Number(last), size - 1) };
}
