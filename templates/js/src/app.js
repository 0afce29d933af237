// {{name}}: a Berth module. Berth routes {{route}} and everything under it
// here; the default export's fetch() answers each request.
//
// Top-level code runs once, at build time (the engine is snapshotted after
// it), so read config and call the host inside the handler.
import { config, log, metrics } from '@berth/sdk';

const ROUTE = '{{route}}';
const BASE = ROUTE.replace(/\/$/, ''); // so that route "/" has "/upstream"

// berth_guest_{{snake}}_greetings_total on the admin port's /metrics.
const greetings = new metrics.Counter('greetings');

/** @type {import('@berth/sdk').Handler} */
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === ROUTE || url.pathname === `${BASE}/`) return greet(url.searchParams.get('name') || 'world');
    if (url.pathname === `${BASE}/upstream`) return upstream();
    return json(404, { error: 'not found' });
  },
};

/** @param {string} name */
function greet(name) {
  const greeting = config.getOr('greeting', 'Hello');
  log.info(`greeted ${name}`);
  greetings.inc();
  return json(200, { message: `${greeting}, ${name}!` });
}

// An outbound call: the global fetch goes through the host, which allows
// only the origins in the module's `allowed_outbound_hosts` and applies its
// timeouts, retries and circuit breaker.
async function upstream() {
  const target = config.get('upstream_url');
  if (!target) return json(503, { error: 'upstream_url is not set' });
  try {
    const response = await fetch(target);
    return json(200, { status: response.status, body: await response.text() });
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    log.warn(`upstream call failed: ${message}`);
    return json(502, { error: message });
  }
}

/**
 * @param {number} status
 * @param {unknown} body
 */
function json(status, body) {
  return Response.json(body, { status });
}
