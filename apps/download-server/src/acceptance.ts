// How long B accepts a token, and so how long its replay record must last. Both come from here,
// so single use holds until the last instant a token can be accepted, on every replica.

/** B replicas' clocks may differ by this much (NTP keeps them far closer): records last longer. */
export const REPLICA_CLOCK_MARGIN_SECONDS = 30;

export interface AcceptanceOptions {
  maxTokenAgeSeconds: number;
  clockToleranceSeconds: number;
}

/**
 * The first instant (epoch ms) at which the verifier refuses a token with these claims. The
 * verifier (jose's rules) compares whole seconds, `now = floor(Date.now() / 1000)`: it accepts
 * while `exp > now - tolerance` and while `now - iat - tolerance <= maxTokenAge`, so the age
 * limit lasts until the end of its last second.
 */
export function refusedFrom(claims: { exp: number; iat: number }, options: AcceptanceOptions): number {
  const tolerance = options.clockToleranceSeconds;
  return Math.min(claims.exp + tolerance, claims.iat + options.maxTokenAgeSeconds + tolerance + 1) * 1000;
}

/** Until when (epoch ms) a used token must stay recorded: past its acceptance on every replica. */
export function keepUsedUntil(claims: { exp: number; iat: number }, options: AcceptanceOptions): number {
  return refusedFrom(claims, options) + REPLICA_CLOCK_MARGIN_SECONDS * 1000;
}

/** The longest a record made now can matter (ms): the compaction period of the journal. */
export function replayWindowMs(options: AcceptanceOptions): number {
  return (
    (options.maxTokenAgeSeconds + options.clockToleranceSeconds + 1 + REPLICA_CLOCK_MARGIN_SECONDS) * 1000
  );
}
