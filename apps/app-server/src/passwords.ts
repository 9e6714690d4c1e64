import { hash, verify } from '@node-rs/argon2';

// `Algorithm.Argon2id`; the package exports it as a const enum, which isolated modules cannot use.
const ARGON2ID = 2;

export interface PasswordCost {
  memoryKib: number;
  timeCost: number;
}

/** argon2id hashing with the configured cost (the OWASP minimum by default, cheaper in tests). */
export function passwordHasher(cost: PasswordCost) {
  const options = {
    algorithm: ARGON2ID,
    memoryCost: cost.memoryKib,
    timeCost: cost.timeCost,
    parallelism: 1,
  };
  // Verified against when the user does not exist, so an unknown username costs as much time as
  // a wrong password and response times do not reveal which accounts exist.
  const dummy = hash('not a password of anyone', options);
  return {
    hash: (password: string) => hash(password, options),
    /** Verifies `password` against `stored`, or spends the same time and fails when there is no user. */
    async verify(stored: string | undefined, password: string): Promise<boolean> {
      const ok = await verify(stored ?? (await dummy), password);
      return stored !== undefined && ok;
    },
  };
}
