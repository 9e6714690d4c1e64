/**
 * A browser-like client for A over real HTTP: keeps the session cookie and sends the CSRF
 * token on state-changing requests, as the README's curl walkthrough does.
 */
export class SessionClient {
  #cookie = '';

  constructor(readonly origin: string) {}

  async fetch(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    const method = (init.method ?? 'GET').toUpperCase();
    // First: fetching the token may start the session, and so set the cookie.
    if (!['GET', 'HEAD'].includes(method)) headers.set('x-csrf-token', await this.#csrf());
    if (this.#cookie) headers.set('cookie', this.#cookie);
    const response = await fetch(new URL(path, this.origin), { ...init, headers, redirect: 'manual' });
    const setCookie = response.headers.get('set-cookie');
    if (setCookie) this.#cookie = setCookie.split(';')[0] as string;
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
