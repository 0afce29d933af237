import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import * as host from '../testing/index.js';

beforeEach(() => host.reset());

test('a TypeScript module runs under the hooks, with .js imports of .ts files', async () => {
  const { default: app } = await import('./fixtures/app.ts');
  host.setConfig({ greeting: 'Hola' });
  const res = await host.request(app, '/?name=Ada');
  assert.deepEqual(await res.json(), { message: 'Hola, Ada!' });
  assert.deepEqual(host.logs().map((l) => l.message), ['greeted Ada']);
});

test('an import the test double does not fake fails, naming it', async () => {
  await assert.rejects(import('./fixtures/unknown-import.js'), {
    message: /wasi:random\/random@0\.2\.12 is not provided by the Berth test double .* fakes wasi:config\/store, wasi:logging\/logging, berth:metrics\/metrics/,
  });
});

test('the fakes check argument types as the component bindings do', async () => {
  const store = await import('wasi:config/store@0.2.0-rc.1');
  // @ts-expect-error: the point of the test
  assert.throws(() => store.get(1), TypeError);
  const logging = await import('wasi:logging/logging@0.1.0-draft');
  // @ts-expect-error: the point of the test
  assert.throws(() => logging.log('loud', '', 'x'), /"loud" is not one of the cases of level/);
  const m = await import('berth:metrics/metrics@0.1.1');
  assert.throws(() => m.counterAdd('c', 1.5, []), RangeError, 'u64 takes no fraction');
  // @ts-expect-error: the point of the test
  assert.throws(() => m.gaugeSet('g', 1, [['k']]), TypeError);
});

test('reset() forgets everything', async () => {
  const { config, log, metrics } = await import('../src/index.js');
  host.setConfig({ a: 'b' });
  host.failConfig('down');
  log.info('x');
  new metrics.Counter('c').inc();
  new metrics.Counter('bad name').inc();
  new metrics.Histogram('h', [1]).observe(1);
  host.onOutbound(() => new Response('x'));
  await fetch('https://example.com/');
  host.reset();
  assert.equal(config.get('a'), undefined);
  assert.deepEqual(host.logs(), []);
  assert.equal(host.counter('c'), 0);
  assert.deepEqual(host.dropped(), []);
  assert.equal(host.buckets('h'), undefined);
  assert.deepEqual(host.sent(), []);
  await assert.rejects(fetch('https://example.com/'), TypeError);
});

test('setConfig takes a key and a value, or an object; values add up', async () => {
  const { config } = await import('../src/index.js');
  host.setConfig('a', '1');
  host.setConfig({ b: '2', c: '3' });
  host.setConfig('a', 'one');
  assert.deepEqual(config.getAll().sort(), [['a', 'one'], ['b', '2'], ['c', '3']]);
});

test('setConfig refuses values that are not strings, and sets none of them', async () => {
  const { config } = await import('../src/index.js');
  // @ts-expect-error: the point of the test
  assert.throws(() => host.setConfig({ name: 'x', port: 8080 }), /config "port": values are strings, got number/);
  // @ts-expect-error: the point of the test
  assert.throws(() => host.setConfig('port'), /config "port": values are strings, got undefined/);
  assert.equal(config.get('name'), undefined);
});

test('fetch is the fake host: refused until onOutbound answers, and every request is recorded', async () => {
  await assert.rejects(fetch('https://example.com/a'), {
    name: 'TypeError',
    message: 'NetworkError when attempting to fetch resource',
  });
  host.onOutbound(async (req) => {
    assert.ok(req instanceof Request);
    return new Response(`echo ${req.method} ${await req.text()}`, { status: 201 });
  });
  const res = await fetch('https://example.com/b', { method: 'POST', body: 'hi', headers: { 'x-k': 'v' } });
  assert.equal(res.status, 201);
  assert.equal(await res.text(), 'echo POST hi');
  const sent = host.sent();
  assert.equal(sent.length, 2);
  assert.deepEqual(sent[0], { method: 'GET', url: 'https://example.com/a', headers: [], body: '' });
  assert.equal(sent[1].method, 'POST');
  assert.equal(sent[1].body, 'hi');
  assert.deepEqual(sent[1].headers.find(([k]) => k === 'x-k'), ['x-k', 'v']);

  host.onOutbound(() => {
    throw new TypeError('NetworkError when attempting to fetch resource');
  });
  await assert.rejects(fetch('https://example.com/c'), TypeError);
  // @ts-expect-error: the point of the test
  assert.throws(() => host.onOutbound('https://example.com'), TypeError);
  host.reset();
  assert.deepEqual(host.sent(), []);
  await assert.rejects(fetch('https://example.com/d'), TypeError);
});
