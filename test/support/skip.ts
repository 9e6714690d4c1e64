/**
 * Whether a suite that needs something a machine may lack (a service, a program) skips here.
 * `missing` says what is missing and how to provide it, or is `undefined` when nothing is. A
 * suite that skips says so: on stderr when its file is collected, and in `reason` for its name.
 * With `required` (CI=true, as `.ci/run` sets it) nothing skips: the suite runs and fails where
 * the thing is missing.
 */
export function skipUnless(
  suite: string,
  missing: string | false | undefined,
  required = Boolean(process.env.CI),
): { skip: boolean; reason: string } {
  if (!missing || required) return { skip: false, reason: '' };
  console.warn(`skipped: ${suite}: ${missing}`);
  return { skip: true, reason: ` (skipped: ${missing})` };
}
