// `node --import @berth/sdk/testing/register --test`: installs the loader
// hooks (./hooks.js) before the test files and the module under test load,
// so their `wasi:*`/`berth:*` imports reach the fakes. Once per process.
import { register } from 'node:module';

const REGISTERED = Symbol.for('@berth/sdk/testing/registered');
const scope = /** @type {Record<symbol, boolean>} */ (/** @type {unknown} */ (globalThis));

if (!scope[REGISTERED]) {
  scope[REGISTERED] = true;
  register('./hooks.js', import.meta.url);
}
