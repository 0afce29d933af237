import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { ConfigError, config } from '../src/index.js';
import * as host from '../testing/index.js';

beforeEach(() => host.reset());

test('get returns a value, or undefined for a missing key', () => {
  host.setConfig({ greeting: 'Hola', empty: '' });
  assert.equal(config.get('greeting'), 'Hola');
  assert.equal(config.get('empty'), '');
  assert.equal(config.get('missing'), undefined);
});

test('getOr falls back only when the key is missing', () => {
  host.setConfig({ greeting: 'Hola', empty: '' });
  assert.equal(config.getOr('greeting', 'Hello'), 'Hola');
  assert.equal(config.getOr('empty', 'Hello'), '', 'an empty value is a value');
  assert.equal(config.getOr('missing', 'Hello'), 'Hello');
});

test('getAll returns every pair', () => {
  host.setConfig({ a: '1', b: '2' });
  assert.deepEqual(
    config.getAll().sort(([x], [y]) => x.localeCompare(y)),
    [['a', '1'], ['b', '2']],
  );
  host.reset();
  assert.deepEqual(config.getAll(), []);
});

test('a store failure throws a ConfigError naming the key, also through getOr', () => {
  host.setConfig({ greeting: 'Hola' });
  host.failConfig('vault unreachable');
  for (const read of [() => config.get('greeting'), () => config.getOr('greeting', 'Hello')]) {
    assert.throws(read, (err) => {
      assert.ok(err instanceof ConfigError);
      assert.equal(err.key, 'greeting');
      assert.equal(err.message, 'reading config key "greeting" failed: upstream error: vault unreachable');
      assert.deepEqual(/** @type {any} */ (err.cause).payload, { tag: 'upstream', val: 'vault unreachable' });
      return true;
    });
  }
});

test('a store failure in getAll throws a ConfigError without a key', () => {
  host.failConfig('disk gone', 'io');
  assert.throws(() => config.getAll(), (err) => {
    assert.ok(err instanceof ConfigError);
    assert.equal(err.key, undefined);
    assert.equal(err.message, 'reading all config keys failed: io error: disk gone');
    return true;
  });
});

test('a key that is not a string is a TypeError, before the host is asked', () => {
  host.failConfig('not reached');
  // @ts-expect-error: the point of the test
  assert.throws(() => config.get(42), { name: 'TypeError', message: 'config key must be a string, got number' });
  // @ts-expect-error: the point of the test
  assert.throws(() => config.getOr(undefined, 'x'), TypeError);
});
