// Unit tests of the handler, outside wasm: `npm test` runs them with
// node --test, the SDK's test double standing in for the host (config,
// logs, metrics and outbound calls in memory; see @berth/sdk/testing).
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import * as host from '@berth/sdk/testing';

import app from '../src/app.js';

const ROUTE = '{{route}}';
const BASE = ROUTE.replace(/\/$/, '');

beforeEach(() => host.reset());

test('greets with the configured greeting, logs and counts', async () => {
  host.setConfig({ greeting: 'Hola' });
  const res = await host.request(app, `${ROUTE}?name=Ada`);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('content-type'), 'application/json');
  assert.deepEqual(await res.json(), { message: 'Hola, Ada!' });
  assert.deepEqual(host.logs(), [{ level: 'info', context: '', message: 'greeted Ada' }]);
  assert.equal(host.counter('greetings'), 1);
});

test('greets the world with Hello by default', async () => {
  const res = await host.request(app, ROUTE);
  assert.deepEqual(await res.json(), { message: 'Hello, world!' });
  assert.equal(host.counter('greetings'), 1);
});

test('any other path is 404', async () => {
  for (const path of [`${BASE}/nope`, `${BASE}/upstream/x`, '/elsewhere']) {
    const res = await host.request(app, path);
    assert.equal(res.status, 404, path);
    assert.deepEqual(await res.json(), { error: 'not found' });
  }
  assert.equal(host.counter('greetings'), 0);
});

test('upstream without upstream_url is 503', async () => {
  const res = await host.request(app, `${BASE}/upstream`);
  assert.equal(res.status, 503);
  assert.deepEqual(await res.json(), { error: 'upstream_url is not set' });
});

test('upstream relays the status and body of the upstream', async () => {
  host.setConfig('upstream_url', 'https://example.com/');
  host.onOutbound(() => new Response('made', { status: 201 }));
  const res = await host.request(app, `${BASE}/upstream`);
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { status: 201, body: 'made' });
  assert.deepEqual(
    host.sent().map((s) => [s.method, s.url]),
    [['GET', 'https://example.com/']],
  );
});

test('an upstream call that fails is 502', async () => {
  host.setConfig('upstream_url', 'https://example.com/');
  // No onOutbound answer: the call fails as one the host refuses does.
  const res = await host.request(app, `${BASE}/upstream`);
  assert.equal(res.status, 502);
  assert.deepEqual(await res.json(), { error: 'NetworkError when attempting to fetch resource' });
  assert.equal(host.logs('warn').length, 1);
});
