// Progressive enhancement for the file list: several files at once, drag and drop, and a
// progress bar per file. Everything else works without this script; the page's CSP allows only
// this file (no inline script, no inline style).
document.documentElement.classList.add('js');

const form = document.getElementById('upload-form');
if (form) enhanceUpload(form);

// "Copy" beside each share link: the field stays selectable by hand without this script.
for (const button of document.querySelectorAll('[data-copy]')) {
  button.addEventListener('click', async () => {
    const field = document.getElementById(button.dataset.copy);
    field.select();
    try {
      await navigator.clipboard.writeText(field.value);
      button.textContent = 'Copied';
    } catch {
      button.textContent = 'Press Ctrl+C';
    }
  });
}

/** @param {HTMLFormElement} uploadForm */
function enhanceUpload(uploadForm) {
  const input = uploadForm.querySelector('input[type="file"]');
  const zone = uploadForm.querySelector('[data-dropzone]');
  const list = document.getElementById('upload-progress');
  const token = document.querySelector('meta[name="csrf-token"]')?.getAttribute('content') ?? '';
  const maxBytes = Number(uploadForm.dataset.maxBytes);
  // Rendered by the server, so sizes read the same everywhere on the page.
  const maxLabel = uploadForm.dataset.maxLabel;
  let remaining = uploadForm.dataset.remainingBytes ? Number(uploadForm.dataset.remainingBytes) : Infinity;
  let busy = false;
  input.multiple = true;

  for (const type of ['dragenter', 'dragover']) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add('dragging');
    });
  }
  for (const type of ['dragleave', 'dragend', 'drop']) {
    zone.addEventListener(type, () => zone.classList.remove('dragging'));
  }
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    if (event.dataTransfer?.files.length) uploadAll([...event.dataTransfer.files]);
  });
  uploadForm.addEventListener('submit', (event) => {
    event.preventDefault();
    if (input.files?.length) uploadAll([...input.files]);
  });

  /** @param {File[]} files */
  async function uploadAll(files) {
    if (busy) return;
    busy = true;
    list.hidden = false;
    list.replaceChildren();
    const items = files.map((file) => ({ file, row: progressRow(file) }));
    let failed = 0;
    // One after the other: each sees the quota the previous one left.
    for (const { file, row } of items) {
      if (!(await uploadOne(file, row))) failed += 1;
    }
    busy = false;
    input.value = '';
    if (failed === 0) {
      window.location.assign(window.location.pathname + window.location.search);
      return;
    }
    if (failed < items.length) {
      const item = document.createElement('li');
      const link = document.createElement('a');
      link.href = window.location.pathname + window.location.search;
      link.textContent = 'Show the updated list';
      item.append(link);
      list.append(item);
    }
  }

  /** @param {File} file */
  function progressRow(file) {
    const item = document.createElement('li');
    const name = document.createElement('span');
    name.className = 'file-name';
    name.textContent = file.name;
    const status = document.createElement('span');
    status.className = 'status';
    status.textContent = 'Waiting';
    const bar = document.createElement('progress');
    bar.max = 100;
    bar.value = 0;
    bar.setAttribute('aria-label', `Upload of ${file.name}`);
    item.append(name, status, bar);
    list.append(item);
    return { item, status, bar };
  }

  /**
   * Sends one file to the JSON API (the same endpoint as any client), with the page's CSRF
   * token in the header; XMLHttpRequest because fetch reports no upload progress.
   * @param {File} file
   * @param {{ item: HTMLLIElement, status: HTMLSpanElement, bar: HTMLProgressElement }} row
   * @returns {Promise<boolean>}
   */
  function uploadOne(file, row) {
    const fail = (text) => {
      row.item.classList.add('failed');
      row.status.textContent = text;
      return false;
    };
    // Refused before a byte is sent: the server would refuse it anyway.
    if (file.size > maxBytes) return Promise.resolve(fail(`Larger than the ${maxLabel} limit`));
    if (file.size > remaining) return Promise.resolve(fail('Not enough space left in your quota'));
    return new Promise((resolve) => {
      const request = new XMLHttpRequest();
      request.open('POST', uploadForm.dataset.api);
      request.setRequestHeader('x-csrf-token', token);
      request.setRequestHeader('accept', 'application/json');
      request.upload.addEventListener('progress', (event) => {
        if (!event.lengthComputable) return;
        const percent = Math.round((event.loaded / event.total) * 100);
        row.bar.value = percent;
        row.status.textContent = `${percent}%`;
      });
      request.addEventListener('load', () => {
        if (request.status === 201) {
          remaining -= file.size;
          row.bar.value = 100;
          row.item.classList.add('done');
          row.status.textContent = 'Uploaded';
          resolve(true);
          return;
        }
        let body = {};
        try {
          body = JSON.parse(request.responseText);
        } catch {}
        resolve(fail(messageFor(request.status, body)));
      });
      request.addEventListener('error', () => resolve(fail('The connection failed; try again')));
      request.addEventListener('abort', () => resolve(fail('Cancelled')));
      const body = new FormData();
      body.append('file', file);
      row.status.textContent = '0%';
      request.send(body);
    });
  }

  function messageFor(status, body) {
    switch (body.error) {
      case 'FILE_TOO_LARGE':
        return `Larger than the ${maxLabel} limit`;
      case 'QUOTA_EXCEEDED':
        return 'Not enough space left in your quota';
      case 'UNAUTHENTICATED':
        return 'Your session has ended: reload the page and sign in again';
      case 'CSRF_INVALID':
        return 'This page had expired: reload it and try again';
      case 'INSUFFICIENT_STORAGE':
        return 'The server is out of storage space';
      default:
        return body.message ?? `Upload failed (HTTP ${status})`;
    }
  }
}
