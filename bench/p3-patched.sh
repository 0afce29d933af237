#!/usr/bin/env bash
# Builds berth with the proposed change to wasmtime-wasi-http's worker loop
# (bench/patches/wasmtime-wasi-http-handler.patch), for an A/B against the
# normal build; bench/NOTES.md has the measurements. Nothing in the checkout
# changes: the crate is patched in a copy, and berth is built from
# `git archive HEAD` with cargo's `--config patch...`, in a target directory
# of its own (P3_TARGET; a cold release build takes ~15 minutes on 2 cores,
# a copy of target/ cuts that to the crates that change).
#
#   bench/p3-patched.sh            # -> $P3_TARGET/release/berth
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${P3_WORK:-$root/target/p3-patched}
target=${P3_TARGET:-$work/target}
version=$(awk '$0 == "name = \"wasmtime-wasi-http\"" { getline; gsub(/"/, "", $3); print $3 }' "$root/Cargo.lock")
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"wasmtime-wasi-http-$version" 2>/dev/null | head -1)
if [ -z "$src" ]; then
    echo "p3-patched: wasmtime-wasi-http $version is not in the cargo registry; run \`cargo fetch\` first" >&2
    exit 1
fi
rm -rf "$work/berth" "$work/wasmtime-wasi-http"
mkdir -p "$work/berth"
cp -r "$src" "$work/wasmtime-wasi-http"
patch --quiet -d "$work/wasmtime-wasi-http" -p1 < "$root/bench/patches/wasmtime-wasi-http-handler.patch"
git -C "$root" archive HEAD | tar -x -C "$work/berth"
cd "$work/berth"
CARGO_TARGET_DIR=$target cargo build --release --bin berth \
    --config "patch.crates-io.wasmtime-wasi-http.path=\"$work/wasmtime-wasi-http\""
echo "p3-patched: $target/release/berth"
