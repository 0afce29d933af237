// What the fake host holds: the fakes (./fakes/*.js) write it, the test
// API (./index.js) reads and sets it. One module instance serves both, since
// the loader hooks resolve the `wasi:*`/`berth:*` imports to these files.

/**
 * @typedef {{ level: string, context: string, message: string }} LogLine
 * @typedef {'counter' | 'gauge' | 'histogram'} Kind
 * @typedef {{ kind: Kind, labelNames: string[], series: Map<string, {labels: Record<string, string>, value: number, values: number[]}> }} Family
 * @typedef {{ name: string, reason: 'invalid' | 'mismatch' }} Dropped
 * @typedef {{ method: string, url: string, headers: Array<[string, string]>, body: string }} Sent
 * @typedef {(request: Request) => Response | Promise<Response>} Outbound
 */

export const state = {
  /** @type {Map<string, string>} */
  config: new Map(),
  /** @type {{ tag: 'upstream' | 'io', val: string } | undefined} the error every store call throws */
  configError: undefined,
  /** @type {LogLine[]} */
  logs: [],
  /** @type {Map<string, Family>} */
  families: new Map(),
  /** @type {Map<string, number[]>} bucket bounds chosen with histogram-buckets */
  buckets: new Map(),
  /** @type {Dropped[]} updates the host would drop */
  dropped: [],
  /** @type {Outbound | undefined} what answers the module's fetch() calls */
  outbound: undefined,
  /** @type {Sent[]} the requests the module's fetch() sent */
  sent: [],
};

export function resetState() {
  state.config.clear();
  state.configError = undefined;
  state.logs.length = 0;
  state.families.clear();
  state.buckets.clear();
  state.dropped.length = 0;
  state.outbound = undefined;
  state.sent.length = 0;
}

/**
 * The check the component model's bindings make on a `string` argument.
 * @param {string} what
 * @param {unknown} value
 */
export function requireString(what, value) {
  if (typeof value !== 'string') {
    throw new TypeError(`${what}: expected a string, received [${typeof value}]`);
  }
}
