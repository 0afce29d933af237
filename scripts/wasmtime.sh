#!/usr/bin/env bash
# Installs wasmtime-cli 50.0.1 (the release Berth builds on) into
# .tools/wasmtime, idempotently: the conformance test and the benchmark run
# `wasmtime serve` next to Berth. Only the features `serve` needs, so it
# builds in a fraction of the default set's time.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=50.0.1
bin="$root/.tools/wasmtime/bin/wasmtime"
if "$bin" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "tools: building wasmtime-cli $version (serve only; a few minutes on 2 cores)"
# Its own target folder: its lock file pins other versions of shared
# dependencies than ours, so sharing ours would only churn it.
cargo install wasmtime-cli --version "$version" --locked --root "$root/.tools/wasmtime" \
  --target-dir "$root/.tools/wasmtime-build" \
  --no-default-features \
  --features run,serve,cranelift,component-model-async,parallel-compilation,pooling-allocator
rm -rf "$root/.tools/wasmtime-build"
