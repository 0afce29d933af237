// The glue between the module's handler and the engine: the build bundles
// `listen(<the entry file's default export>)` as the component's entry, and
// the test double calls `respond` the same way.
import * as log from './log.js';

/**
 * @typedef {{ fetch(request: Request): Response | Promise<Response> }} Handler
 */

/**
 * Serves `handler` through wasi:http/incoming-handler, using the `fetch`
 * event of the StarlingMonkey engine that componentize-js embeds. It runs
 * at build time (the top level of the module is evaluated once, then
 * snapshotted), so a missing handler fails the build.
 * @param {unknown} handler
 */
export function listen(handler) {
  const checked = checkHandler(handler);
  addEventListener('fetch', (/** @type {any} */ event) => {
    event.respondWith(respond(checked, event.request));
  });
}

/**
 * @param {unknown} handler
 * @returns {Handler}
 */
export function checkHandler(handler) {
  const fetch = handler && /** @type {{fetch?: unknown}} */ (handler).fetch;
  if (typeof fetch !== 'function') {
    throw new TypeError(
      'the entry file must `export default { fetch(request) { ... } }` (a handler returning a Response)',
    );
  }
  return /** @type {Handler} */ (handler);
}

/**
 * Runs the handler for one request. Like the Rust SDK's `Result` handlers,
 * a thrown error (or anything but a Response) is logged at error level and
 * answered with a 500 JSON body `{"error": "<message>"}`.
 * @param {Handler} handler
 * @param {Request} request
 * @returns {Promise<Response>}
 */
export async function respond(handler, request) {
  try {
    const response = await handler.fetch(request);
    if (!(response instanceof Response)) {
      throw new TypeError(`fetch() returned ${describe(response)}, not a Response`);
    }
    return response;
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    log.error(`handler failed: ${message}`);
    return Response.json({ error: message }, { status: 500 });
  }
}

/** @param {unknown} value */
function describe(value) {
  if (value === null) return 'null';
  if (typeof value === 'object') return `an object (${value.constructor?.name ?? 'no prototype'})`;
  return typeof value;
}
