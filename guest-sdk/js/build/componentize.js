// Builds a Berth component from a module's entry file:
//
// 1. bundle: the entry (JavaScript or TypeScript) and everything it imports,
//    @berth/sdk included, into one ES module with rolldown, leaving the
//    `wasi:*` and `berth:*` imports to the component model. StarlingMonkey
//    loads files by relative path only, so bare imports (`@berth/sdk`,
//    other npm packages) must be bundled; TypeScript is stripped, not
//    type-checked (run `tsc` for that).
// 2. glue: the bundle's entry is `listen(<the entry's default export>)`
//    (src/handler.js), which serves it through the engine's `fetch` event.
// 3. componentize: componentize-js against Berth's `world service`, its WASI
//    relabelled for the engine (./wit.js).
import { mkdtemp, mkdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rolldown } from 'rolldown';

import { COMPONENTIZE_JS_VERSION, WORLD, findWitDir, relabelWasi } from './wit.js';

const HANDLER_JS = fileURLToPath(new URL('../src/handler.js', import.meta.url));
const GLUE_ID = '\0berth:entry';

/**
 * Bundles `entry` with the glue into one ES module at `out`.
 * @param {string} entry the module's entry file; its default export is the handler
 * @param {string} out the bundle to write
 */
export async function bundle(entry, out) {
  const entryPath = resolve(entry);
  await stat(entryPath); // a clear ENOENT naming the file, before rolldown's
  const build = await rolldown({
    input: GLUE_ID,
    // The engine is a web-like environment: fetch, Request, Response, URL,
    // streams, crypto; no Node built-ins.
    platform: 'browser',
    external: [/^wasi:/, /^berth:/],
    plugins: [
      {
        name: 'berth-entry',
        resolveId(id) {
          return id === GLUE_ID ? id : null;
        },
        load(id) {
          if (id !== GLUE_ID) return null;
          return [
            `import handler from ${JSON.stringify(entryPath)};`,
            `import { listen } from ${JSON.stringify(HANDLER_JS)};`,
            'listen(handler);',
            '',
          ].join('\n');
        },
      },
    ],
  });
  try {
    await build.write({ file: out, format: 'esm', codeSplitting: false });
  } finally {
    await build.close();
  }
}

/**
 * Loads componentize-js from the module's node_modules and checks it is
 * the release this SDK's WIT is relabelled for.
 */
async function loadComponentizeJs() {
  try {
    import.meta.resolve('@bytecodealliance/componentize-js');
  } catch {
    throw new Error(
      `@bytecodealliance/componentize-js is not installed: add "@bytecodealliance/componentize-js": ` +
        `"${COMPONENTIZE_JS_VERSION}" to the module's devDependencies and run npm install`,
    );
  }
  let mod;
  try {
    mod = await import('@bytecodealliance/componentize-js');
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    // componentize-js imports @bytecodealliance/preview2-shim without
    // depending on it, so it must sit at the top of node_modules. npm puts
    // it there only while nothing else wants another version; jco-std's
    // optional peer (^0.25) makes a second `npm install` move jco's 0.26
    // out of the top, hence the templates' direct pin of 0.25.0.
    const hint = message.includes("'@bytecodealliance/preview2-shim'")
      ? ': add "@bytecodealliance/preview2-shim": "0.25.0" to the module\'s devDependencies and run npm install'
      : '';
    throw new Error(`loading @bytecodealliance/componentize-js failed: ${message}${hint}`);
  }
  if (mod.version !== COMPONENTIZE_JS_VERSION) {
    throw new Error(
      `@bytecodealliance/componentize-js ${mod.version} is installed, but @berth/sdk builds with ` +
        `${COMPONENTIZE_JS_VERSION} (its engine fixes the wasi:http version of the world): ` +
        `pin "${COMPONENTIZE_JS_VERSION}" in package.json`,
    );
  }
  return mod;
}

/**
 * Builds the component.
 * @param {{entry: string, out: string, wit?: string}} options
 *   `wit`: a WIT folder laid out like guest-sdk/wit (default: Berth's)
 * @returns {Promise<{out: string, bundle: string, bytes: number, seconds: {bundle: number, componentize: number}}>}
 */
export async function build({ entry, out, wit }) {
  const started = performance.now();
  const { componentize } = await loadComponentizeJs();
  const outPath = resolve(out);
  await mkdir(dirname(outPath), { recursive: true });
  // The bundle stays beside the component: it is what the engine runs, so
  // the line numbers of the engine's errors are its lines.
  const bundlePath = join(dirname(outPath), `${basename(outPath, extname(outPath))}.bundle.js`);
  await bundle(entry, bundlePath);
  const bundled = performance.now();

  const work = await mkdtemp(join(tmpdir(), 'berth-wit-'));
  try {
    const witDir = join(work, 'wit');
    await relabelWasi(wit ?? findWitDir(), witDir);
    const { component } = await componentize({
      sourcePath: bundlePath,
      witPath: witDir,
      worldName: WORLD,
    });
    await writeFile(outPath, component);
    return {
      out: outPath,
      bundle: bundlePath,
      bytes: component.byteLength,
      seconds: {
        bundle: (bundled - started) / 1000,
        componentize: (performance.now() - bundled) / 1000,
      },
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
