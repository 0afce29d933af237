// A JavaScript module for Berth: a `fetch` event handler, served through
// wasi:http/incoming-handler by the StarlingMonkey engine that
// componentize-js embeds (about 13 MB, too large for a ConfigMap: it ships
// through an OCI registry).
addEventListener('fetch', (event) =>
  event.respondWith(
    (async () => {
      const url = new URL(event.request.url);
      const name = url.searchParams.get('name') ?? 'world';
      return new Response(`hello from JavaScript, ${name}\n`, {
        headers: { 'content-type': 'text/plain; charset=utf-8' },
      });
    })(),
  ),
);
