import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { ENGINE_WASI_VERSION, findWitDir, relabelWasi, wasiVersion } from '../build/wit.js';

const REPO_WIT = fileURLToPath(new URL('../../wit', import.meta.url));
// A hand-made 0.2.10 copy of the same WASI, kept by the JavaScript example.
const JS_HELLO_DEPS = fileURLToPath(new URL('../../../examples/js-hello/wit/deps', import.meta.url));

/** @type {string} */
let out;
before(async () => {
  out = await mkdtemp(join(tmpdir(), 'berth-wit-test-'));
});
after(() => rm(out, { recursive: true, force: true }));

test('in the repository, the WIT is guest-sdk/wit', () => {
  assert.equal(findWitDir(), REPO_WIT);
});

test('the WASI packages are relabelled for the engine; the others are copied as they are', async () => {
  const from = await wasiVersion(REPO_WIT);
  assert.notEqual(from, ENGINE_WASI_VERSION, 'nothing to test if the host speaks the engine\'s version');
  const result = await relabelWasi(REPO_WIT, out);
  assert.deepEqual(result, { from, to: ENGINE_WASI_VERSION, files: 12 });

  const world = await readFile(join(out, 'world.wit'), 'utf8');
  assert.match(world, new RegExp(`include wasi:http/proxy@${ENGINE_WASI_VERSION.replaceAll('.', '\\.')};`));
  for (const pkg of ['config/store.wit', 'config/world.wit', 'logging/logging.wit', 'berth-metrics/metrics.wit']) {
    assert.equal(
      await readFile(join(out, 'deps', pkg), 'utf8'),
      await readFile(join(REPO_WIT, 'deps', pkg), 'utf8'),
      pkg,
    );
  }
  const cli = await readFile(join(out, 'deps', 'cli.wit'), 'utf8');
  assert.match(cli, new RegExp(`@since\\(version = ${ENGINE_WASI_VERSION.replaceAll('.', '\\.')}\\)`));
  for (const file of await readdir(join(out, 'deps'))) {
    if (!file.endsWith('.wit')) continue;
    const text = await readFile(join(out, 'deps', file), 'utf8');
    assert.doesNotMatch(text, new RegExp(`wasi:[a-z/-]+@${from.replaceAll('.', '\\.')}`), file);
  }
});

test('the relabelled WASI equals the 0.2.10 copy of examples/js-hello', { skip: !existsSync(JS_HELLO_DEPS) }, async () => {
  for (const file of ['clocks.wit', 'filesystem.wit', 'http.wit', 'io.wit', 'random.wit', 'sockets.wit']) {
    assert.equal(
      await readFile(join(out, 'deps', file), 'utf8'),
      await readFile(join(JS_HELLO_DEPS, file), 'utf8'),
      file,
    );
  }
  // cli.wit differs only by the unstable timezone import guest-sdk/wit drops (see its README).
  const ours = (await readFile(join(out, 'deps', 'cli.wit'), 'utf8')).split('\n');
  const theirs = (await readFile(join(JS_HELLO_DEPS, 'cli.wit'), 'utf8'))
    .split('\n')
    .filter((line) => !/clocks-timezone|wasi:clocks\/timezone/.test(line));
  assert.deepEqual(ours, theirs);
});

test('a folder without wasi:http is refused', async () => {
  await assert.rejects(relabelWasi(join(REPO_WIT, 'deps', 'config'), out), /ENOENT/);
});
