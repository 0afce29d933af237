// Log lines through wasi:logging. The host writes each as a JSON line with
// the module name, request id and trace id, at the level given, and rate
// limits them per module (`limits.log_rate`). `console.log` also reaches the
// host's log, but only as untyped stdout lines at info level.
import { log as hostLog } from 'wasi:logging/logging@0.1.0-draft';

/**
 * wasi:logging's `context` argument, printed by the host as the `context`
 * field. The Rust SDK passes its module path; a bundled JS module has none
 * worth printing, and the host already names the module.
 */
const CONTEXT = '';

/**
 * @param {'trace' | 'debug' | 'info' | 'warn' | 'error'} level
 * @param {unknown} message
 */
function emit(level, message) {
  hostLog(level, CONTEXT, typeof message === 'string' ? message : String(message));
}

/** Very detailed tracing. @param {unknown} message */
export function trace(message) {
  emit('trace', message);
}

/** Debugging information. @param {unknown} message */
export function debug(message) {
  emit('debug', message);
}

/** Normal operation. @param {unknown} message */
export function info(message) {
  emit('info', message);
}

/** Something looks wrong. @param {unknown} message */
export function warn(message) {
  emit('warn', message);
}

/** Something failed. @param {unknown} message */
export function error(message) {
  emit('error', message);
}
