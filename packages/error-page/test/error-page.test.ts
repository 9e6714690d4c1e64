import { expect, it } from 'vitest';
import { errorPage } from '../src/index.ts';

it('shows the title, the message and the link, every one of them escaped', () => {
  const page = errorPage({
    title: 'Not <possible>',
    message: 'Because "a" & \'b\'',
    link: { href: 'http://a.test/?x="><script>', text: 'Back <home>' },
  });
  expect(page).toContain('<title>Not &#60;possible&#62;</title>');
  expect(page).toContain('<h1>Not &#60;possible&#62;</h1>');
  expect(page).toContain('<p>Because &#34;a&#34; &#38; &#39;b&#39;.</p>');
  expect(page).toContain('<a href="http://a.test/?x=&#34;&#62;&#60;script&#62;">Back &#60;home&#62;</a>');
  expect(page).not.toMatch(/<script|style|<link/);
});
