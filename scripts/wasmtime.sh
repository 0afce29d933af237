#!/usr/bin/env bash
# Installs wasmtime-cli 50.0.1 (the release Berth builds on) into .tools/,
# idempotently: the conformance test and the benchmark run `wasmtime serve`
# next to Berth. Only the features `serve` needs, so it builds in a fraction
# of the default set's time.
#
#   scripts/wasmtime.sh         the bench's build, fully optimised, into
#                               .tools/wasmtime
#   scripts/wasmtime.sh test    the conformance test's build into
#                               .tools/wasmtime-test: opt-level 1 and many
#                               codegen units, which roughly halves the
#                               build; the test compares answers, not
#                               speed. With WASMTIME_BACKGROUND=1 (`make
#                               test`) it builds alongside the host's
#                               builds; .tools/wasmtime-test-building marks
#                               a build in progress and the test waits for
#                               it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
version=50.0.1
mode="${1:-bench}"
features=run,serve,cranelift,component-model-async,parallel-compilation,pooling-allocator
# wasmtime 50 needs the toolchain rust-toolchain.toml pins (cargo install
# builds outside this folder's toolchain file otherwise).
toolchain="+$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"

case "$mode" in
  bench)
    bin=.tools/wasmtime/bin/wasmtime
    if "$bin" --version 2>/dev/null | grep -q "$version"; then
      exit 0
    fi
    echo "tools: building wasmtime-cli $version (serve only, optimised; 10-20 minutes on 2 cores)"
    # Its own target folder: its lock file pins other versions of shared
    # dependencies than ours, so sharing ours would only churn it.
    cargo "$toolchain" install wasmtime-cli --version "$version" --locked --root .tools/wasmtime \
      --target-dir .tools/wasmtime-build --no-default-features --features "$features"
    rm -rf .tools/wasmtime-build
    ;;
  test)
    bin=.tools/wasmtime-test/bin/wasmtime
    marker=.tools/wasmtime-test-building
    # The bench's build serves the test as well.
    if "$bin" --version 2>/dev/null | grep -q "$version" \
      || .tools/wasmtime/bin/wasmtime --version 2>/dev/null | grep -q "$version"; then
      exit 0
    fi
    # A marker left by a build that was killed would hold the test forever.
    if [ -d "$marker" ] && ! pgrep -f "cargo .*install wasmtime-cli .*wasmtime-test" >/dev/null; then
      rm -rf "$marker" .tools/wasmtime-test-build
    fi
    [ -d "$marker" ] && exit 0
    mkdir -p "$marker"
    build() {
      local rc=0
      CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_LTO=false \
        CARGO_PROFILE_RELEASE_INCREMENTAL=false \
        cargo "$toolchain" install wasmtime-cli --quiet --version "$version" --locked \
        --root .tools/wasmtime-test --target-dir .tools/wasmtime-test-build \
        --no-default-features --features "$features" || rc=$?
      rm -rf .tools/wasmtime-test-build "$marker"
      return $rc
    }
    if [ "${WASMTIME_BACKGROUND:-0}" = 1 ]; then
      echo "tools: building wasmtime-cli $version for the conformance test in the background (.tools/wasmtime-test.log)"
      (build > .tools/wasmtime-test.log 2>&1 &)
    else
      echo "tools: building wasmtime-cli $version for the conformance test (several minutes, once)"
      build
    fi
    ;;
  *)
    echo "usage: scripts/wasmtime.sh [bench|test]" >&2
    exit 2
    ;;
esac
