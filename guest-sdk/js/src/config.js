// Configuration values set by the operator for this module:
// `[modules.NAME.config]` in berth.toml (overridable per key by environment
// variables on the host), and `[modules.NAME.secrets]`, which the host
// serves through the same store.
import * as store from 'wasi:config/store@0.2.0-rc.1';

/** A failure of the host's config store (not a missing key). */
export class ConfigError extends Error {
  /**
   * @param {string | undefined} key the key being read; `undefined` for getAll()
   * @param {unknown} cause what the store threw
   */
  constructor(key, cause) {
    const what = key === undefined ? 'reading all config keys' : `reading config key "${key}"`;
    super(`${what} failed: ${describe(cause)}`, { cause });
    this.name = 'ConfigError';
    /** The key being read; `undefined` for `getAll()`. */
    this.key = key;
  }
}

/**
 * The value of `key`, or `undefined` when it is not set.
 * @param {string} key
 * @returns {string | undefined}
 */
export function get(key) {
  if (typeof key !== 'string') {
    throw new TypeError(`config key must be a string, got ${typeof key}`);
  }
  try {
    return store.get(key) ?? undefined;
  } catch (err) {
    throw new ConfigError(key, err);
  }
}

/**
 * The value of `key`, or `fallback` when it is not set. A store failure
 * still throws: only a missing key falls back.
 * @param {string} key
 * @param {string} fallback
 * @returns {string}
 */
export function getOr(key, fallback) {
  return get(key) ?? fallback;
}

/**
 * Every key and value, in the host's order.
 * @returns {Array<[string, string]>}
 */
export function getAll() {
  try {
    return store.getAll().map(([key, value]) => /** @type {[string, string]} */ ([key, value]));
  } catch (err) {
    throw new ConfigError(undefined, err);
  }
}

/**
 * The text of a store error: componentize-js throws the WIT `error`
 * variant (`{tag: 'upstream' | 'io', val: string}`) as an Error's `payload`.
 * @param {unknown} err
 * @returns {string}
 */
function describe(err) {
  const payload = /** @type {{payload?: {tag?: unknown, val?: unknown}}} */ (err ?? {}).payload;
  if (payload && typeof payload.tag === 'string' && typeof payload.val === 'string') {
    return `${payload.tag} error: ${payload.val}`;
  }
  return err instanceof Error ? err.message : String(err);
}
