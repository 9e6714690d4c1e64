/**
 * The cookies a browser keeps for A: every `Set-Cookie` of a response (A sets the session cookie
 * and, at sign-in, the device cookie), sent back on every request.
 */
export class CookieJar {
  readonly #cookies = new Map<string, string>();

  /** The `Cookie` header to send, or `undefined` while the jar is empty. */
  header(): string | undefined {
    if (this.#cookies.size === 0) return undefined;
    return [...this.#cookies].map(([name, value]) => `${name}=${value}`).join('; ');
  }

  /** Keeps the cookies `response` sets (an empty value removes one). */
  update(response: Response): void {
    for (const line of response.headers.getSetCookie()) {
      const pair = line.split(';')[0] as string;
      const eq = pair.indexOf('=');
      const [name, value] = [pair.slice(0, eq), pair.slice(eq + 1)];
      if (value === '') this.#cookies.delete(name);
      else this.#cookies.set(name, value);
    }
  }
}

/**
 * A browser-like client for A over real HTTP: keeps the session cookie and sends the CSRF
 * token on state-changing requests, as the README's curl walkthrough does.
 */
export class SessionClient {
  readonly #jar = new CookieJar();

  constructor(readonly origin: string) {}

  async fetch(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    const method = (init.method ?? 'GET').toUpperCase();
    // First: fetching the token may start the session, and so set the cookie.
    if (!['GET', 'HEAD'].includes(method)) headers.set('x-csrf-token', await this.#csrf());
    const cookie = this.#jar.header();
    if (cookie) headers.set('cookie', cookie);
    const response = await fetch(new URL(path, this.origin), { ...init, headers, redirect: 'manual' });
    this.#jar.update(response);
    return response;
  }

  async json<T>(path: string, init: RequestInit = {}): Promise<{ status: number; body: T }> {
    const response = await this.fetch(path, init);
    return { status: response.status, body: (await response.json()) as T };
  }

  async #csrf(): Promise<string> {
    const { body } = await this.json<{ token: string }>('/api/csrf');
    return body.token;
  }
}

/**
 * A signed-up user of A over real HTTP that fetches its session's CSRF token once and reuses it,
 * so it can still send a state-changing request while A's database is down, and costs a load test
 * no extra request per upload.
 */
export class SignedInClient {
  readonly jar = new CookieJar();
  csrf = '';

  constructor(readonly origin: string) {}

  static async signUp(appOrigin: string, username: string, password: string): Promise<SignedInClient> {
    const client = new SignedInClient(appOrigin);
    await client.refreshCsrf();
    const response = await client.fetch('/api/auth/register', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ username, password }),
    });
    if (response.status !== 201) throw new Error(`sign-up: ${response.status} ${await response.text()}`);
    // Signing in starts a new session, which has a CSRF secret of its own.
    await client.refreshCsrf();
    return client;
  }

  async refreshCsrf(): Promise<void> {
    const response = await this.fetch('/api/csrf');
    if (response.status !== 200) throw new Error(`/api/csrf: ${response.status}`);
    this.csrf = ((await response.json()) as { token: string }).token;
  }

  async fetch(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    if (!['GET', 'HEAD'].includes((init.method ?? 'GET').toUpperCase()) && this.csrf)
      headers.set('x-csrf-token', this.csrf);
    const cookie = this.jar.header();
    if (cookie) headers.set('cookie', cookie);
    const response = await fetch(new URL(path, this.origin), { ...init, headers, redirect: 'manual' });
    this.jar.update(response);
    return response;
  }

  async json<T>(path: string, init: RequestInit = {}): Promise<{ status: number; body: T }> {
    const response = await this.fetch(path, init);
    return { status: response.status, body: (await response.json()) as T };
  }
}
