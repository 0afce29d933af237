// @berth/sdk: config, logs and metrics over Berth's host world. The
// handler is the entry file's `export default { fetch(request) }`; outbound
// calls use the global `fetch`. See ../README.md.
export * as config from './config.js';
export * as log from './log.js';
export * as metrics from './metrics.js';
export { ConfigError } from './config.js';
