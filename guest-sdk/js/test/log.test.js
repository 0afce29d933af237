import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { log } from '../src/index.js';
import * as host from '../testing/index.js';

beforeEach(() => host.reset());

test('each level reaches wasi:logging with its level, in order', () => {
  log.trace('t');
  log.debug('d');
  log.info('i');
  log.warn('w');
  log.error('e');
  assert.deepEqual(host.logs(), [
    { level: 'trace', context: '', message: 't' },
    { level: 'debug', context: '', message: 'd' },
    { level: 'info', context: '', message: 'i' },
    { level: 'warn', context: '', message: 'w' },
    { level: 'error', context: '', message: 'e' },
  ]);
  assert.deepEqual(host.logs('warn').map((l) => l.message), ['w']);
});

test('a message that is not a string is converted', () => {
  log.info(42);
  log.error(new Error('boom'));
  log.warn(undefined);
  assert.deepEqual(host.logs().map((l) => l.message), ['42', 'Error: boom', 'undefined']);
});

test('an empty message is logged as is', () => {
  log.info('');
  assert.deepEqual(host.logs().map((l) => l.message), ['']);
});
