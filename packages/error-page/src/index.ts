import Negotiator from 'negotiator';

/** A navigation: the client ranks text/html above application/json (ties go to JSON). */
export function prefersHtml(accept: string | undefined): boolean {
  if (!accept) return false;
  return new Negotiator({ headers: { accept } }).mediaType(['application/json', 'text/html']) === 'text/html';
}

/**
 * The page a browser gets when A or B refuses a navigation that has no better place to go: the
 * reason in words and one way on. Self-contained (no script, no style sheet, nothing fetched),
 * so it renders under B's `default-src 'none'; sandbox` policy as under A's.
 */
export function errorPage(page: {
  title: string;
  message: string;
  link: { href: string; text: string };
}): string {
  return `<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${html(page.title)}</title>
<h1>${html(page.title)}</h1>
<p>${html(page.message)}.</p>
<p><a href="${html(page.link.href)}">${html(page.link.text)}</a></p>
</html>
`;
}

const html = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
