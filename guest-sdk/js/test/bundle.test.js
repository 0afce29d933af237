import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { bundle } from '../build/componentize.js';

const fixture = (/** @type {string} */ name) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));

/** @type {string} */
let out;
before(async () => {
  out = await mkdtemp(join(tmpdir(), 'berth-bundle-test-'));
});
after(() => rm(out, { recursive: true, force: true }));

test('the bundle holds the entry, the SDK and the glue, and leaves the host imports', async () => {
  const file = join(out, 'entry.js');
  await bundle(fixture('entry.js'), file);
  const code = await readFile(file, 'utf8');
  assert.match(code, /from "wasi:config\/store@0\.2\.0-rc\.1"/);
  assert.match(code, /from "berth:metrics\/metrics@0\.1\.1"/);
  assert.match(code, /addEventListener\("fetch"/);
  assert.match(code, /listen\(/);
  assert.doesNotMatch(code, /@berth\/sdk/, 'the SDK is bundled, not imported');
  assert.doesNotMatch(code, /^export /m, 'the component exports nothing from JS');
});

test('TypeScript entries are stripped of their types', async () => {
  const file = join(out, 'app.js');
  await bundle(fixture('app.ts'), file);
  const code = await readFile(file, 'utf8');
  assert.doesNotMatch(code, /interface Greeting|name: string|body: Greeting/);
  assert.match(code, /greeted/);
});

test('an entry without a default export fails the bundle, naming the file', async () => {
  await assert.rejects(bundle(fixture('no-default.js'), join(out, 'x.js')), /default.*no-default\.js|no-default\.js.*default/s);
});

test('a missing entry fails, naming it', async () => {
  await assert.rejects(bundle(fixture('nope.js'), join(out, 'y.js')), /ENOENT.*nope\.js/);
});
