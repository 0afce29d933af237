// The WIT a JavaScript component is built against: Berth's `world service`
// (guest-sdk/wit, the one copy of it), with its WASI 0.2 packages relabelled
// to the version componentize-js' engine speaks.
//
// Why: componentize-js 0.23.0 embeds a StarlingMonkey engine built against
// wasi:http@0.2.10. The engine itself exports
// `wasi:http/incoming-handler@0.2.10` and imports wasi:http@0.2.10, and
// componentize-js requires the target world to name exactly that version
// (with 0.2.12 it fails: "failed to find export of interface
// `wasi:http/incoming-handler@0.2.12` function `handle`"). WASI 0.2.10 and
// 0.2.12 have the same WIT apart from the version strings (compare
// examples/js-hello/wit/deps, a 0.2.10 copy), and Berth links any 0.2.x, so
// rather than keep a second copy of WASI in the repo, the build rewrites
// the version of guest-sdk/wit's copy into a temporary folder.
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The componentize-js release this SDK builds with; the engine and the version below go with it. */
export const COMPONENTIZE_JS_VERSION = '0.23.0';

/** The WASI 0.2 version of the engine of componentize-js {@link COMPONENTIZE_JS_VERSION}. */
export const ENGINE_WASI_VERSION = '0.2.10';

/** The world of guest-sdk/wit that modules target. */
export const WORLD = 'service';

const PACKAGE_DIR = dirname(dirname(fileURLToPath(import.meta.url)));

/**
 * Where Berth's WIT is: `wit/` inside this package when `berth new` vendored
 * it there, else `guest-sdk/wit` beside this package in the repository.
 * @returns {string}
 */
export function findWitDir() {
  for (const dir of [join(PACKAGE_DIR, 'wit'), join(PACKAGE_DIR, '..', 'wit')]) {
    if (existsSync(join(dir, 'world.wit')) && existsSync(join(dir, 'deps', 'http.wit'))) {
      return dir;
    }
  }
  throw new Error(
    `Berth's WIT is missing: expected ${join(PACKAGE_DIR, 'wit')}/world.wit (copied there by ` +
      '`berth new`) or the repository\'s guest-sdk/wit',
  );
}

/**
 * The WASI 0.2 version of a WIT folder: that of its `wasi:http` package.
 * @param {string} witDir
 * @returns {Promise<string>}
 */
export async function wasiVersion(witDir) {
  const http = await readFile(join(witDir, 'deps', 'http.wit'), 'utf8');
  const m = /^\s*package\s+wasi:http@(0\.2\.\d+)\s*;/m.exec(http);
  if (!m) throw new Error(`${join(witDir, 'deps', 'http.wit')}: no \`package wasi:http@0.2.x;\``);
  return m[1];
}

/**
 * Copies every `.wit` file of `witDir` into `outDir`, with WASI `from`
 * relabelled `to`: references to `wasi:*@from` everywhere, and the
 * `@since(version = from)` gates inside the WASI packages themselves.
 * Other packages (wasi:config, wasi:logging, berth:metrics) keep theirs.
 * @param {string} witDir
 * @param {string} outDir
 * @param {string} to
 * @returns {Promise<{from: string, to: string, files: number}>}
 */
export async function relabelWasi(witDir, outDir, to = ENGINE_WASI_VERSION) {
  const from = await wasiVersion(witDir);
  const v = from.replaceAll('.', '\\.');
  // `wasi:io/streams@0.2.12.{...}`: the version ends at a `.` followed by
  // `{`, or at `;`, whitespace or end of text, never at another digit.
  const reference = new RegExp(`(\\bwasi:[a-z][a-z0-9-]*(?:/[a-z][a-z0-9-]*)?@)${v}(?![0-9])`, 'g');
  const since = new RegExp(`(@since\\(\\s*version\\s*=\\s*)${v}(?![0-9])`, 'g');
  let files = 0;
  for (const file of await witFiles(witDir)) {
    let text = await readFile(file, 'utf8');
    const isWasi = new RegExp(`^\\s*package\\s+wasi:[a-z-]+@${v}\\s*;`, 'm').test(text);
    text = text.replace(reference, `$1${to}`);
    if (isWasi) text = text.replace(since, `$1${to}`);
    const target = join(outDir, relative(witDir, file));
    await mkdir(dirname(target), { recursive: true });
    await writeFile(target, text);
    files += 1;
  }
  return { from, to, files };
}

/**
 * @param {string} dir
 * @returns {Promise<string[]>}
 */
async function witFiles(dir) {
  const out = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await witFiles(path)));
    else if (entry.name.endsWith('.wit')) out.push(path);
  }
  return out.sort();
}
