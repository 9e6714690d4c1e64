// Postgres refuses some strings JavaScript holds: NUL in `text` (22021) and in `jsonb` (22P05),
// and lone surrogates in `jsonb`. A client that sends them must get a 400, never a 500.

/** Whether Postgres can store `text` as it is: well-formed Unicode without NUL. */
export const isStorableText = (text: string): boolean => text.isWellFormed() && !text.includes('\u0000');

/** `text` as Postgres can store it: lone surrogates replaced (U+FFFD), NUL removed. */
export const storableText = (text: string): string => text.toWellFormed().replaceAll('\u0000', '');
