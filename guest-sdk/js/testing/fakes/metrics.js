// A fake of berth:metrics/metrics@0.1.1 that keeps the series as the host
// does (host/src/metrics.rs, GuestMetrics): an update with an invalid name
// or labels, or with another kind or other label names than the metric's
// first use, is dropped and recorded in `state.dropped`; bucket bounds are
// checked the same way. The operator's series cap is not modelled.
import { requireString, state } from '../state.js';

/** @typedef {import('../state.js').Kind} Kind */

/** @param {string} name */
function validName(name) {
  return name.length <= 100 && /^[a-zA-Z_][a-zA-Z0-9_]*$/.test(name) && !name.startsWith('__');
}

/**
 * @param {string} name
 * @param {'invalid' | 'mismatch'} reason
 */
function drop(name, reason) {
  state.dropped.push({ name, reason });
}

/**
 * @param {string} fn
 * @param {string} name
 * @param {unknown} labels
 * @returns {Array<[string, string]>}
 */
function checkArgs(fn, name, labels) {
  requireString(`berth:metrics/metrics#${fn} name`, name);
  if (!Array.isArray(labels)) throw new TypeError(`berth:metrics/metrics#${fn}: labels must be a list`);
  for (const pair of labels) {
    if (!Array.isArray(pair) || pair.length !== 2) {
      throw new TypeError(`berth:metrics/metrics#${fn}: a label must be a [name, value] tuple`);
    }
    requireString(`berth:metrics/metrics#${fn} label name`, pair[0]);
    requireString(`berth:metrics/metrics#${fn} label value`, pair[1]);
  }
  return /** @type {Array<[string, string]>} */ (labels);
}

/**
 * @param {string} name
 * @param {Array<[string, string]>} labels
 * @param {Kind} kind
 * @param {(series: {value: number, values: number[]}) => void} apply
 */
function update(name, labels, kind, apply) {
  const labelsOk =
    labels.length <= 10 &&
    labels.every(([k, v]) => validName(k) && k !== 'module' && new TextEncoder().encode(v).length <= 256);
  if (!validName(name) || !labelsOk) return drop(name, 'invalid');
  const sorted = [...labels].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const labelNames = sorted.map(([k]) => k);
  let family = state.families.get(name);
  if (!family) {
    family = { kind, labelNames, series: new Map() };
    state.families.set(name, family);
  }
  if (family.kind !== kind || family.labelNames.join('\0') !== labelNames.join('\0')) {
    return drop(name, 'mismatch');
  }
  const key = JSON.stringify(sorted.map(([, v]) => v));
  let series = family.series.get(key);
  if (!series) {
    series = { labels: Object.fromEntries(sorted), value: 0, values: [] };
    family.series.set(key, series);
  }
  apply(series);
}

/**
 * @param {string} name
 * @param {bigint | number} value u64
 * @param {Array<[string, string]>} labels
 */
export function counterAdd(name, value, labels) {
  // As the bindings convert a u64: BigInt() (a fraction throws), then wrapped.
  const n = BigInt.asUintN(64, BigInt(value));
  update(name, checkArgs('counter-add', name, labels), 'counter', (s) => {
    s.value += Number(n);
  });
}

/**
 * @param {string} name
 * @param {number} value
 * @param {Array<[string, string]>} labels
 */
export function gaugeSet(name, value, labels) {
  update(name, checkArgs('gauge-set', name, labels), 'gauge', (s) => {
    s.value = +value;
  });
}

/**
 * @param {string} name
 * @param {number} value
 * @param {Array<[string, string]>} labels
 */
export function histogramObserve(name, value, labels) {
  update(name, checkArgs('histogram-observe', name, labels), 'histogram', (s) => {
    s.values.push(+value);
  });
}

/**
 * @param {string} name
 * @param {Float64Array | number[]} buckets
 */
export function histogramBuckets(name, buckets) {
  requireString('berth:metrics/metrics#histogram-buckets name', name);
  const bounds = Array.from(buckets, Number);
  const valid =
    validName(name) &&
    bounds.length >= 1 &&
    bounds.length <= 64 &&
    bounds.every(Number.isFinite) &&
    bounds.every((b, i) => i === 0 || bounds[i - 1] < b);
  if (!valid) return drop(name, 'invalid');
  const chosen = state.buckets.get(name);
  if (chosen) {
    if (chosen.join() !== bounds.join()) drop(name, 'mismatch');
    return;
  }
  // Made already, with the default buckets or as another kind.
  if (state.families.has(name)) return drop(name, 'mismatch');
  state.buckets.set(name, bounds);
}
