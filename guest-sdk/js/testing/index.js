// @berth/sdk/testing: a fake Berth host for unit tests under `node --test`,
// the JavaScript counterpart of the Rust SDK's `berth_sdk::testing` (same
// names, in camelCase).
//
//   node --import @berth/sdk/testing/register --test test/
//
// The register hook sends the module's `wasi:config`, `wasi:logging` and
// `berth:metrics` imports to in-memory fakes, and importing this module
// replaces the global `fetch` with the fake host's outbound calls. A test
// sets what the fakes serve and reads what they captured; state lives until
// reset(). Each test file runs in a process of its own.
//
// Importing this module also installs the hooks, for tests that import the
// module under test dynamically; a static import of it is resolved before
// any code runs, hence the `--import` above.
import './register.js';

import { resetState, state } from './state.js';

/** @typedef {import('./state.js').LogLine} LogLine */
/** @typedef {import('./state.js').Dropped} Dropped */
/** @typedef {import('./state.js').Sent} Sent */
/** @typedef {import('./state.js').Outbound} Outbound */
/** @typedef {Readonly<Record<string, string>>} Labels */

/**
 * What the engine's fetch rejects with when the host refuses or fails a
 * call, whatever the reason.
 */
const NETWORK_ERROR = 'NetworkError when attempting to fetch resource';

/**
 * The module's outbound calls: recorded, then answered by `onOutbound`'s
 * function; without one they fail as a call the host refuses does.
 * @param {RequestInfo | URL} input
 * @param {RequestInit} [init]
 * @returns {Promise<Response>}
 */
async function fakeFetch(input, init) {
  const request = new Request(input, init);
  state.sent.push({
    method: request.method,
    url: request.url,
    headers: [...request.headers],
    body: await request.clone().text(),
  });
  if (!state.outbound) throw new TypeError(NETWORK_ERROR);
  return state.outbound(request);
}
globalThis.fetch = fakeFetch;

/** Forgets config, store failures, log lines, metrics, dropped updates, outbound answers and sent requests. */
export function reset() {
  resetState();
}

/**
 * Sets config values (and secrets: the host serves both through one
 * store), over those set before: `setConfig('greeting', 'Hola')` or
 * `setConfig({ greeting: 'Hola', upstream_url: '...' })`.
 * @param {string | Readonly<Record<string, string>>} keyOrValues
 * @param {string} [value]
 */
export function setConfig(keyOrValues, value) {
  const entries =
    typeof keyOrValues === 'string' ? [[keyOrValues, value]] : Object.entries(keyOrValues ?? {});
  for (const [key, v] of entries) {
    if (typeof v !== 'string') throw new TypeError(`config "${key}": values are strings, got ${typeof v}`);
  }
  for (const [key, v] of entries) state.config.set(String(key), /** @type {string} */ (v));
}

/**
 * Makes every config read fail, as a store that is down would, until
 * reset().
 * @param {string} message
 * @param {'upstream' | 'io'} [kind]
 */
export function failConfig(message, kind = 'upstream') {
  state.configError = { tag: kind, val: message };
}

/**
 * The log lines written so far, oldest first; only those at `level` if given.
 * @param {LogLine['level']} [level]
 * @returns {LogLine[]}
 */
export function logs(level) {
  return state.logs.filter((l) => level === undefined || l.level === level).map((l) => ({ ...l }));
}

/**
 * @param {string} name
 * @param {import('./state.js').Kind} kind
 */
function family(name, kind) {
  const f = state.families.get(name);
  if (f && f.kind !== kind) throw new Error(`metric ${name} is a ${f.kind}, not a ${kind}`);
  return f;
}

/**
 * The series of `f` with exactly these labels.
 * @param {import('./state.js').Family | undefined} f
 * @param {Labels} labels
 */
function seriesOf(f, labels) {
  if (!f) return undefined;
  const sorted = Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  if (sorted.map(([k]) => k).join('\0') !== f.labelNames.join('\0')) return undefined;
  return f.series.get(JSON.stringify(sorted.map(([, v]) => v)));
}

/**
 * A counter's value: the sum over all its label sets, or of the series with
 * these labels. 0 when nothing was counted.
 * @param {string} name
 * @param {Labels} [labels]
 * @returns {number}
 */
export function counter(name, labels) {
  const f = family(name, 'counter');
  if (labels === undefined) return [...(f?.series.values() ?? [])].reduce((sum, s) => sum + s.value, 0);
  return seriesOf(f, labels)?.value ?? 0;
}

/**
 * A gauge's value in the series with these labels (default: none), or
 * `undefined` when it was never set.
 * @param {string} name
 * @param {Labels} [labels]
 * @returns {number | undefined}
 */
export function gauge(name, labels = {}) {
  return seriesOf(family(name, 'gauge'), labels)?.value;
}

/**
 * The values a histogram recorded, in order: over all its label sets, or in
 * the series with these labels.
 * @param {string} name
 * @param {Labels} [labels]
 * @returns {number[]}
 */
export function observations(name, labels) {
  const f = family(name, 'histogram');
  if (labels === undefined) return [...(f?.series.values() ?? [])].flatMap((s) => s.values);
  return [...(seriesOf(f, labels)?.values ?? [])];
}

/**
 * The bucket bounds the module chose for a histogram, if any.
 * @param {string} name
 * @returns {number[] | undefined}
 */
export function buckets(name) {
  const b = state.buckets.get(name);
  return b && [...b];
}

/**
 * Metric updates the host would have dropped (and counted in
 * `berth_guest_metrics_dropped_total`): `invalid` names, labels or buckets,
 * or a `mismatch` with the metric's first use.
 * @returns {Dropped[]}
 */
export function dropped() {
  return state.dropped.map((d) => ({ ...d }));
}

/**
 * Answers the module's outbound `fetch` calls (after reset(): none, and a
 * call rejects with `TypeError: NetworkError when attempting to fetch
 * resource`, as one the host refuses does). A throw from `answer` is what
 * the module's fetch rejects with.
 * @param {Outbound} answer
 */
export function onOutbound(answer) {
  if (typeof answer !== 'function') throw new TypeError('onOutbound takes a function (request) => Response');
  state.outbound = answer;
}

/**
 * The requests the module's `fetch` sent so far, oldest first.
 * @returns {Sent[]}
 */
export function sent() {
  return state.sent.map((s) => ({ ...s, headers: s.headers.map(([k, v]) => /** @type {[string, string]} */ ([k, v])) }));
}

/**
 * Sends a request to a handler the way the component does: a thrown error
 * becomes a 500 JSON answer and an error log line. `input` is a Request, a
 * URL, or a path (`/hello?name=Ada`, on `http://localhost`).
 * @param {unknown} handler the entry file's default export
 * @param {Request | URL | string} input
 * @param {RequestInit} [init]
 * @returns {Promise<Response>}
 */
export async function request(handler, input, init) {
  // Imported here, not at the top: src/handler.js imports wasi:logging,
  // which resolves only once the hooks of ./register.js are in place.
  const { checkHandler, respond } = await import('../src/handler.js');
  const req = input instanceof Request ? input : new Request(new URL(input, 'http://localhost'), init);
  return respond(checkHandler(handler), req);
}
