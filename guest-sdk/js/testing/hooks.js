// Node module customization hooks (registered by ./register.js) that let a
// Berth module run under `node --test`:
//
// - resolve: `wasi:config/store@…`, `wasi:logging/logging@…` and
//   `berth:metrics/metrics@…` (which only exist inside a component) to the
//   in-memory fakes in ./fakes; any other `wasi:`/`berth:` import fails with
//   a message saying so.
// - load: strips the types from TypeScript files (`.ts`, `.mts`) with the
//   same transformer the build bundles with, so tests run TypeScript on
//   Node 20, which cannot. A relative `./x.js` that does not exist is
//   looked for as `./x.ts`, as TypeScript's own resolution does.
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { transformSync } from 'rolldown/utils';

/** The interfaces the fake host provides, by name without version. */
const FAKES = new Map([
  ['wasi:config/store', new URL('./fakes/config.js', import.meta.url).href],
  ['wasi:logging/logging', new URL('./fakes/logging.js', import.meta.url).href],
  ['berth:metrics/metrics', new URL('./fakes/metrics.js', import.meta.url).href],
]);

const TYPESCRIPT = /\.m?ts$/;

/**
 * @param {string} specifier
 * @param {{parentURL?: string, conditions: string[]}} context
 * @param {(specifier: string, context?: object) => Promise<{url: string, format?: string}>} nextResolve
 */
export async function resolve(specifier, context, nextResolve) {
  const wit = /^((?:wasi|berth):[a-z][a-z0-9-]*\/[a-z][a-z0-9-]*)(?:@[^/]*)?$/.exec(specifier);
  if (wit) {
    const url = FAKES.get(wit[1]);
    if (!url) {
      throw new Error(
        `${specifier} is not provided by the Berth test double (@berth/sdk/testing), which fakes ` +
          `${[...FAKES.keys()].join(', ')}`,
      );
    }
    return { url, shortCircuit: true };
  }
  try {
    return await nextResolve(specifier, context);
  } catch (err) {
    const relative = specifier.startsWith('./') || specifier.startsWith('../');
    if (/** @type {{code?: string}} */ (err).code === 'ERR_MODULE_NOT_FOUND' && relative && /\.m?js$/.test(specifier)) {
      const ts = specifier.replace(/js$/, 'ts');
      try {
        return await nextResolve(ts, context);
      } catch {
        // Report the specifier as written.
      }
    }
    throw err;
  }
}

/**
 * @param {string} url
 * @param {{format?: string}} context
 * @param {(url: string, context?: object) => Promise<{format: string, source: unknown}>} nextLoad
 */
export async function load(url, context, nextLoad) {
  if (!url.startsWith('file:') || !TYPESCRIPT.test(new URL(url).pathname)) {
    return nextLoad(url, context);
  }
  const path = fileURLToPath(url);
  const result = transformSync(path, await readFile(path, 'utf8'), { lang: 'ts', sourcemap: true });
  if (result.errors.length > 0) {
    throw new SyntaxError(`${path}: ${result.errors.map((e) => e.message).join('\n')}`);
  }
  let source = result.code;
  if (result.map) {
    // For --enable-source-maps: stack traces with the TypeScript lines.
    const map = Buffer.from(JSON.stringify(result.map)).toString('base64');
    source += `\n//# sourceMappingURL=data:application/json;base64,${map}\n`;
  }
  return { format: 'module', source, shortCircuit: true };
}
