// A fake of wasi:config/store@0.2.0-rc.1, served to code under test in
// place of the host's (see ../hooks.js).
import { requireString, state } from '../state.js';

/** As componentize-js throws an `err` result: an Error carrying the WIT value. */
class ComponentError extends Error {
  /** @param {{ tag: string, val: string }} payload */
  constructor(payload) {
    super(`${String(payload.tag)} (see error.payload)`);
    this.payload = payload;
  }
}

/**
 * @param {string} key
 * @returns {string | undefined}
 */
export function get(key) {
  requireString('wasi:config/store#get key', key);
  if (state.configError) throw new ComponentError(state.configError);
  return state.config.get(key);
}

/** @returns {Array<[string, string]>} */
export function getAll() {
  if (state.configError) throw new ComponentError(state.configError);
  return [...state.config.entries()];
}
