// A fake of wasi:logging/logging@0.1.0-draft that captures the lines.
import { requireString, state } from '../state.js';

const LEVELS = new Set(['trace', 'debug', 'info', 'warn', 'error', 'critical']);

/**
 * @param {string} level
 * @param {string} context
 * @param {string} message
 */
export function log(level, context, message) {
  if (!LEVELS.has(level)) throw new TypeError(`"${level}" is not one of the cases of level`);
  requireString('wasi:logging/logging#log context', context);
  requireString('wasi:logging/logging#log message', message);
  state.logs.push({ level, context, message });
}
