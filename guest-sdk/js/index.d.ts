// Types of @berth/sdk (src/index.js). `npm run typecheck` checks that the
// implementation matches them (test/api.types.ts).

/**
 * The module's request handler: the entry file's default export.
 *
 * ```ts
 * import type { Handler } from '@berth/sdk';
 * export default {
 *   async fetch(request) {
 *     return Response.json({ path: new URL(request.url).pathname });
 *   },
 * } satisfies Handler;
 * ```
 *
 * A thrown error (or a value that is not a Response) is logged at error
 * level and answered with 500 `{"error": "<message>"}`. Outbound calls use
 * the global `fetch`, which the host runs through its outbound policy
 * (`allowed_outbound_hosts`, timeouts, retries, circuit breaker).
 */
export interface Handler {
  fetch(request: Request): Response | Promise<Response>;
}

/** A failure of the host's config store (not a missing key). */
export declare class ConfigError extends Error {
  constructor(key: string | undefined, cause: unknown);
  /** The key being read; `undefined` for `config.getAll()`. */
  readonly key: string | undefined;
}

/**
 * Configuration values set by the operator for this module:
 * `[modules.NAME.config]` and `[modules.NAME.secrets]` in berth.toml (or
 * `BERTH_MODULES__NAME__CONFIG__KEY` in the environment). Read them in the
 * handler, not at the top level of the module: the top level runs once, at
 * build time.
 */
export declare namespace config {
  /** The value of `key`, or `undefined` when it is not set. Throws {@link ConfigError} if the store fails. */
  function get(key: string): string | undefined;
  /** The value of `key`, or `fallback` when it is not set. Throws {@link ConfigError} if the store fails. */
  function getOr(key: string, fallback: string): string;
  /** Every key and value. Throws {@link ConfigError} if the store fails. */
  function getAll(): Array<[string, string]>;
}

/**
 * Log lines, written by the host as JSON with the module name, request id
 * and trace id. A non-string message is converted with `String()`.
 */
export declare namespace log {
  function trace(message: unknown): void;
  function debug(message: unknown): void;
  function info(message: unknown): void;
  function warn(message: unknown): void;
  function error(message: unknown): void;
}

/**
 * Metrics the module defines, exported by the host as
 * `berth_guest_<module>_<name>` (counters get `_total`). Names and labels
 * go to the host unchanged; an invalid name, a change of label names or of
 * kind, or a series over the operator's cap is dropped and counted by the
 * host, never an error in the module.
 *
 * ```ts
 * const orders = new metrics.Counter('orders');
 * orders.add(2, { kind: 'book' });
 * ```
 */
export declare namespace metrics {
  /** Label names and values: `{ kind: 'book' }`. Names `[a-zA-Z_][a-zA-Z0-9_]*`, not `module`. */
  type Labels = Readonly<Record<string, string>>;

  /** A counter: only goes up. */
  class Counter {
    /** @param name `[a-zA-Z_][a-zA-Z0-9_]*`; exported as `berth_guest_<module>_<name>_total` */
    constructor(name: string);
    readonly name: string;
    /** Adds one. */
    inc(labels?: Labels): void;
    /** Adds `n`, a non-negative integer (RangeError otherwise). */
    add(n: number | bigint, labels?: Labels): void;
  }

  /** A gauge: a value that goes up and down. */
  class Gauge {
    constructor(name: string);
    readonly name: string;
    /** Sets the value. */
    set(value: number, labels?: Labels): void;
  }

  /**
   * A histogram of values (seconds, for durations), with the host's latency
   * buckets (0.5 ms to 30 s) unless `buckets` are given: 1 to 64 finite
   * upper bounds, strictly increasing (`+Inf` is added).
   */
  class Histogram {
    constructor(name: string, buckets?: readonly number[]);
    readonly name: string;
    readonly buckets: Float64Array | undefined;
    /** Records a value. */
    observe(value: number, labels?: Labels): void;
  }
}
