import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { metrics } from '../src/index.js';
import * as host from '../testing/index.js';

beforeEach(() => host.reset());

test('a counter adds, per label set', () => {
  const orders = new metrics.Counter('orders');
  orders.inc();
  orders.inc();
  orders.add(5);
  orders.add(10n);
  orders.add(0);
  assert.equal(host.counter('orders'), 17);
  assert.equal(host.counter('orders', {}), 17);

  const sold = new metrics.Counter('sold');
  sold.add(2, { kind: 'book' });
  sold.add(3, { kind: 'pen' });
  sold.inc({ kind: 'book' });
  assert.equal(host.counter('sold', { kind: 'book' }), 3);
  assert.equal(host.counter('sold', { kind: 'pen' }), 1 + 2);
  assert.equal(host.counter('sold'), 6, 'without labels: the sum of every series');
  assert.equal(host.counter('sold', { kind: 'cup' }), 0);
  assert.equal(host.counter('never'), 0);
  assert.deepEqual(host.dropped(), []);
});

test('a counter increment must be a non-negative integer', () => {
  const c = new metrics.Counter('c');
  for (const bad of [-1, 1.5, NaN, Infinity, -1n, 1n << 64n, 2 ** 53]) {
    assert.throws(() => c.add(bad), RangeError, String(bad));
  }
  // @ts-expect-error: the point of the test
  assert.throws(() => c.add('3'), RangeError);
  c.add((1n << 64n) - 1n);
  assert.equal(host.counter('c'), 2 ** 64);
});

test('an invalid name goes to the host unchanged, which drops it; nothing throws', () => {
  const bad = new metrics.Counter('bad-name');
  bad.inc();
  new metrics.Gauge('9lives').set(1);
  new metrics.Histogram('').observe(1);
  new metrics.Counter('__reserved').inc();
  new metrics.Counter('x'.repeat(101)).inc();
  assert.deepEqual(
    host.dropped().map((d) => d.reason),
    ['invalid', 'invalid', 'invalid', 'invalid', 'invalid'],
  );
  assert.equal(host.dropped()[0].name, 'bad-name');
  assert.equal(host.counter('bad-name'), 0);
});

test('invalid labels are dropped by the host; labels that are not an object throw', () => {
  const c = new metrics.Counter('hits');
  c.inc({ 'bad label': 'x' });
  c.inc({ module: 'spoofed' });
  c.inc({ k: 'v'.repeat(257) });
  assert.deepEqual(host.dropped().map((d) => d.reason), ['invalid', 'invalid', 'invalid']);
  // @ts-expect-error: the point of the test
  assert.throws(() => c.inc([['kind', 'book']]), TypeError);
  // @ts-expect-error: the point of the test
  assert.throws(() => c.inc('kind=book'), TypeError);
  // @ts-expect-error: the point of the test
  assert.throws(() => c.inc(null), TypeError);
});

test('label values are sent as strings', () => {
  const c = new metrics.Counter('status');
  // @ts-expect-error: numbers are converted, but the type asks for strings
  c.inc({ code: 404 });
  assert.equal(host.counter('status', { code: '404' }), 1);
});

test('a metric keeps the kind and label names of its first use', () => {
  new metrics.Counter('m').inc({ a: '1' });
  new metrics.Counter('m').inc({ b: '1' });
  new metrics.Counter('m').inc();
  new metrics.Gauge('m').set(1, { a: '1' });
  assert.deepEqual(host.dropped().map((d) => d.reason), ['mismatch', 'mismatch', 'mismatch']);
  assert.equal(host.counter('m'), 1);
  assert.throws(() => host.gauge('m'), /metric m is a counter, not a gauge/);
});

test('label order does not matter', () => {
  const c = new metrics.Counter('pairs');
  c.inc({ a: '1', b: '2' });
  c.inc({ b: '2', a: '1' });
  assert.equal(host.counter('pairs', { b: '2', a: '1' }), 2);
  assert.deepEqual(host.dropped(), []);
});

test('a gauge keeps the last value, per label set', () => {
  const g = new metrics.Gauge('temperature');
  assert.equal(host.gauge('temperature'), undefined);
  g.set(3);
  g.set(1.5);
  assert.equal(host.gauge('temperature'), 1.5);

  const depth = new metrics.Gauge('queue_depth');
  depth.set(7, { queue: 'slow' });
  depth.set(2, { queue: 'fast' });
  depth.set(-1, { queue: 'slow' });
  assert.equal(host.gauge('queue_depth', { queue: 'slow' }), -1);
  assert.equal(host.gauge('queue_depth', { queue: 'fast' }), 2);
  assert.equal(host.gauge('queue_depth'), undefined, 'no series without labels');
  // @ts-expect-error: the point of the test
  assert.throws(() => g.set('3'), TypeError);
});

test('a histogram records values; chosen buckets are sent once, before the first observation', () => {
  const h = new metrics.Histogram('order_items', [1, 5, 25]);
  assert.deepEqual(h.buckets && [...h.buckets], [1, 5, 25]);
  h.observe(3);
  h.observe(12);
  h.observe(30, { shop: 'eu' });
  assert.deepEqual(host.buckets('order_items'), [1, 5, 25]);
  assert.deepEqual(host.observations('order_items', {}), [3, 12]);
  assert.deepEqual(host.observations('order_items'), [3, 12]);
  assert.deepEqual(host.dropped().map((d) => d.reason), ['mismatch'], 'other label names than the first use');

  const bySize = new metrics.Histogram('bytes', [100, 1000]);
  bySize.observe(50, { route: 'a' });
  bySize.observe(500, { route: 'b' });
  assert.deepEqual(host.observations('bytes', { route: 'b' }), [500]);
  assert.deepEqual(host.observations('bytes'), [50, 500], 'without labels: every series');

  const latency = new metrics.Histogram('lookup_seconds');
  latency.observe(0.012);
  assert.equal(host.buckets('lookup_seconds'), undefined, 'the host default');
  assert.deepEqual(host.observations('lookup_seconds'), [0.012]);
});

test('invalid buckets go to the host, which drops them and keeps its default', () => {
  new metrics.Histogram('h1', [5, 1]).observe(1);
  new metrics.Histogram('h2', []).observe(1);
  new metrics.Histogram('h3', [1, Infinity]).observe(1);
  assert.deepEqual(host.dropped().map((d) => [d.name, d.reason]), [['h1', 'invalid'], ['h2', 'invalid'], ['h3', 'invalid']]);
  assert.deepEqual(host.observations('h1'), [1]);
  // @ts-expect-error: the point of the test
  assert.throws(() => new metrics.Histogram('h4', 5), TypeError);
});

test('other buckets for a histogram that exists are a mismatch', () => {
  new metrics.Histogram('size').observe(1);
  new metrics.Histogram('size', [1, 2]).observe(2);
  assert.deepEqual(host.dropped().map((d) => d.reason), ['mismatch']);
  new metrics.Histogram('size2', [1, 2]).observe(1);
  new metrics.Histogram('size2', [1, 2]).observe(1);
  new metrics.Histogram('size2', [1, 3]).observe(1);
  assert.deepEqual(host.dropped().map((d) => d.reason), ['mismatch', 'mismatch']);
});

test('a name that is not a string throws at construction', () => {
  // @ts-expect-error: the point of the test
  assert.throws(() => new metrics.Counter(undefined), TypeError);
  // @ts-expect-error: the point of the test
  assert.throws(() => new metrics.Gauge(1), TypeError);
  // @ts-expect-error: the point of the test
  assert.throws(() => new metrics.Histogram({}), TypeError);
});
