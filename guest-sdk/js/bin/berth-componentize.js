#!/usr/bin/env node
// berth-componentize ENTRY -o OUT.wasm: builds a Berth component from a
// JavaScript or TypeScript module whose default export is `{ fetch }`.
import { relative } from 'node:path';
import { parseArgs } from 'node:util';

import { build } from '../build/componentize.js';

const USAGE = `usage: berth-componentize ENTRY -o OUT.wasm [--wit DIR]

Bundles ENTRY (.js or .ts; its default export is { fetch(request) }) with
@berth/sdk and builds a wasi:http component for Berth with componentize-js.
  -o, --out FILE   the component to write
  --wit DIR        a WIT folder laid out like guest-sdk/wit (default: Berth's)`;

/**
 * @param {string} message
 * @returns {never}
 */
function fail(message) {
  process.stderr.write(`berth-componentize: ${message}\n`);
  process.exit(1);
}

/** @returns {{entry: string, out: string, wit?: string}} */
function parse() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        out: { type: 'string', short: 'o' },
        wit: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    fail(`${err instanceof Error ? err.message : String(err)}\n${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (positionals.length !== 1 || !values.out) fail(`one ENTRY and -o OUT are needed\n${USAGE}`);
  return { entry: positionals[0], out: values.out, wit: values.wit };
}

try {
  const result = await build(parse());
  const { bundle, componentize } = result.seconds;
  process.stdout.write(
    `built ${relative(process.cwd(), result.out)} (${(result.bytes / 1e6).toFixed(1)} MB) in ` +
      `${(bundle + componentize).toFixed(1)} s (bundle ${bundle.toFixed(1)} s, componentize ${componentize.toFixed(1)} s)\n`,
  );
} catch (err) {
  fail(err instanceof Error ? err.message : String(err));
}
