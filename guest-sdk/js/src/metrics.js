// Metrics the module defines, exported by the host on its Prometheus
// endpoint as `berth_guest_<module>_<name>` (counters get `_total`), with a
// `module` label and the labels given here.
//
// As in the Rust SDK, names and labels go to the host unchanged: an invalid
// name (not `[a-zA-Z_][a-zA-Z0-9_]*`), a change of label names or kind, or
// a series over the operator's cap is dropped and counted by the host
// (`berth_guest_metrics_dropped_total`), never an error here. What throws is
// what cannot be sent at all: a name or a value of the wrong type, labels
// that are not an object, a counter increment that is not a non-negative
// integer.
import * as host from 'berth:metrics/metrics@0.1.1';

const U64_MAX = (1n << 64n) - 1n;

/**
 * Label names and values, as an object: `{ kind: 'book', region: 'eu' }`.
 * @typedef {Readonly<Record<string, string>>} Labels
 */

/**
 * @param {Labels | undefined} labels
 * @returns {Array<[string, string]>}
 */
function pairs(labels) {
  if (labels === undefined) return [];
  if (labels === null || typeof labels !== 'object' || Array.isArray(labels)) {
    throw new TypeError('metric labels must be an object such as { kind: "book" }');
  }
  return Object.entries(labels).map(([name, value]) => [name, String(value)]);
}

/**
 * @param {unknown} name
 * @returns {string}
 */
function checkName(name) {
  if (typeof name !== 'string') {
    throw new TypeError(`metric name must be a string, got ${typeof name}`);
  }
  return name;
}

/**
 * @param {string} what
 * @param {unknown} value
 * @returns {number}
 */
function checkNumber(what, value) {
  if (typeof value !== 'number') {
    throw new TypeError(`${what} must be a number, got ${typeof value}`);
  }
  return value;
}

/** A counter: only goes up. */
export class Counter {
  /** @param {string} name `[a-zA-Z_][a-zA-Z0-9_]*`; exported as `berth_guest_<module>_<name>_total` */
  constructor(name) {
    /** @readonly */
    this.name = checkName(name);
  }

  /**
   * Adds one.
   * @param {Labels} [labels]
   */
  inc(labels) {
    this.add(1, labels);
  }

  /**
   * Adds `n`: a non-negative integer (a number or a bigint up to 2^64 - 1).
   * @param {number | bigint} n
   * @param {Labels} [labels]
   */
  add(n, labels) {
    let value;
    if (typeof n === 'bigint') {
      value = n;
    } else if (Number.isSafeInteger(n)) {
      value = BigInt(n);
    } else {
      throw new RangeError(`counter ${this.name}: add() takes a non-negative integer, got ${String(n)}`);
    }
    if (value < 0n || value > U64_MAX) {
      throw new RangeError(`counter ${this.name}: add() takes a non-negative integer, got ${String(n)}`);
    }
    host.counterAdd(this.name, value, pairs(labels));
  }
}

/** A gauge: a value that goes up and down. */
export class Gauge {
  /** @param {string} name */
  constructor(name) {
    /** @readonly */
    this.name = checkName(name);
  }

  /**
   * Sets the value.
   * @param {number} value
   * @param {Labels} [labels]
   */
  set(value, labels) {
    host.gaugeSet(this.name, checkNumber(`gauge ${this.name}: the value`, value), pairs(labels));
  }
}

/**
 * A histogram of values (seconds, for durations). Its buckets are the
 * host's latency buckets (0.5 ms to 30 s) unless chosen here.
 */
export class Histogram {
  /**
   * @param {string} name
   * @param {readonly number[]} [buckets] upper bounds: 1 to 64 finite values,
   *   strictly increasing (`+Inf` is added). Bounds the host refuses, or
   *   bounds that differ from those the histogram already has (from an
   *   earlier version of the module), are dropped and counted by the host,
   *   which keeps the histogram's buckets as they are.
   */
  constructor(name, buckets) {
    /** @readonly */
    this.name = checkName(name);
    if (buckets !== undefined && !Array.isArray(buckets)) {
      throw new TypeError(`histogram ${this.name}: buckets must be an array of numbers`);
    }
    /** @readonly @type {Float64Array | undefined} */
    this.buckets = buckets === undefined ? undefined : Float64Array.from(buckets);
    // Whether this instance has told the host its buckets: once per
    // instance, which for a WASI 0.2 module is once per request by
    // default. The host takes the same bounds again as a no-op.
    /** @private */
    this.chosen = false;
  }

  /**
   * Records a value.
   * @param {number} value
   * @param {Labels} [labels]
   */
  observe(value, labels) {
    checkNumber(`histogram ${this.name}: the value`, value);
    const series = pairs(labels);
    if (this.buckets !== undefined && !this.chosen) {
      this.chosen = true;
      host.histogramBuckets(this.name, this.buckets);
    }
    host.histogramObserve(this.name, value, series);
  }
}
