import assert from 'node:assert/strict';
import { afterEach, beforeEach, test } from 'node:test';

import { checkHandler, listen } from '../src/handler.js';
import * as host from '../testing/index.js';

beforeEach(() => host.reset());

test('a handler answers through request()', async () => {
  const app = {
    fetch(/** @type {Request} */ req) {
      return Response.json({ path: new URL(req.url).pathname, method: req.method });
    },
  };
  const res = await host.request(app, '/hello?name=Ada', { method: 'POST' });
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { path: '/hello', method: 'POST' });
  const again = await host.request(app, new Request('http://example.com/x'));
  assert.deepEqual(await again.json(), { path: '/x', method: 'GET' });
});

test('a handler that throws answers 500 with the message, and logs it', async () => {
  const res = await host.request({ fetch: async () => { throw new Error('no stock'); } }, '/');
  assert.equal(res.status, 500);
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  assert.deepEqual(await res.json(), { error: 'no stock' });
  assert.deepEqual(host.logs().map((l) => [l.level, l.message]), [['error', 'handler failed: no stock']]);
});

test('a handler that throws a non-Error, or returns no Response, answers 500', async () => {
  const thrown = await host.request({ fetch() { throw 'plain'; } }, '/');
  assert.deepEqual([thrown.status, await thrown.json()], [500, { error: 'plain' }]);
  // @ts-expect-error: the point of the test
  const text = await host.request({ fetch: () => 'hi' }, '/');
  assert.deepEqual([text.status, await text.json()], [500, { error: 'fetch() returned string, not a Response' }]);
  // @ts-expect-error: the point of the test
  const obj = await host.request({ fetch: async () => ({ status: 200 }) }, '/');
  assert.deepEqual(await obj.json(), { error: 'fetch() returned an object (Object), not a Response' });
});

test('an entry without a fetch function is refused', () => {
  for (const bad of [undefined, null, {}, { fetch: 'x' }, () => new Response()]) {
    assert.throws(() => checkHandler(bad), /must `export default \{ fetch\(request\)/);
  }
});

/** @type {any} */
const scope = globalThis;
afterEach(() => {
  delete scope.addEventListener;
});

test('listen() answers the fetch event of the engine', async () => {
  /** @type {((event: unknown) => void) | undefined} */
  let listener;
  scope.addEventListener = (/** @type {string} */ type, /** @type {(event: unknown) => void} */ fn) => {
    assert.equal(type, 'fetch');
    listener = fn;
  };
  listen({ fetch: (/** @type {Request} */ req) => new Response(`hi ${new URL(req.url).searchParams.get('name')}`) });
  assert.ok(listener);
  /** @type {Promise<Response> | undefined} */
  let answered;
  listener({ request: new Request('http://localhost/?name=Ada'), respondWith: (/** @type {Promise<Response>} */ p) => { answered = p; } });
  assert.ok(answered);
  assert.equal(await (await answered).text(), 'hi Ada');
});

test('listen() refuses a missing handler before registering', () => {
  let registered = false;
  scope.addEventListener = () => { registered = true; };
  assert.throws(() => listen({}), TypeError);
  assert.equal(registered, false);
});
