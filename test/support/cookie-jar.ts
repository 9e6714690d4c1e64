/**
 * The cookies a browser would keep from A's answers, by name: the session cookie and the device
 * cookie (sign-in throttling) side by side. A cookie set to expire is dropped.
 */
export class CookieJar {
  readonly #cookies = new Map<string, string>();

  /** Takes every `Set-Cookie` of `response`. */
  take(response: Response): void {
    for (const line of response.headers.getSetCookie()) {
      const [pair = '', ...attributes] = line.split(';');
      const at = pair.indexOf('=');
      const name = pair.slice(0, at).trim();
      const expired = attributes.some(
        (a) => /^\s*max-age=0\s*$/i.test(a) || /^\s*expires=thu, 01 jan 1970/i.test(a),
      );
      if (expired) this.#cookies.delete(name);
      else this.#cookies.set(name, pair.slice(at + 1).trim());
    }
  }

  /** The `Cookie` header to send, or `''` when there is none. */
  header(): string {
    return [...this.#cookies].map(([name, value]) => `${name}=${value}`).join('; ');
  }

  get(name: string): string | undefined {
    return this.#cookies.get(name);
  }
}
