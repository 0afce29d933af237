#!/usr/bin/env bash
# Installs what building and testing Berth needs, skipping what is there.
set -euo pipefail

# The toolchain rust-toolchain.toml pins, with its components and targets
# (rustup no longer installs it on first use everywhere).
cd "$(dirname "$0")/.."
if ! rustup run "$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)" rustc --version >/dev/null 2>&1; then
  echo "setup: installing the pinned Rust toolchain"
  rustup toolchain install
fi
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
for comp in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$comp"; then
    echo "setup: adding $comp"
    rustup component add "$comp"
  fi
done

# Test peers: a real Prometheus server (and promtool) from Debian; curl for
# the smoke test.
apt_packages=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v curl >/dev/null || apt_packages+=(curl)
# The pod and image checks: network namespaces (ip), mount namespaces and
# chroot (util-linux, coreutils) for the emulated kubelet and engine.
command -v ip >/dev/null || apt_packages+=(iproute2)
command -v unshare >/dev/null || apt_packages+=(util-linux)
# h2load, a real HTTP/2 load client, for the h2c tests and the bench.
command -v h2load >/dev/null || apt_packages+=(nghttp2-client)
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "setup: installing ${apt_packages[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# The status page test: headless Chromium driven through chromedriver.
browser_packages=()
command -v chromium >/dev/null || browser_packages+=(chromium)
command -v chromedriver >/dev/null || browser_packages+=(chromium-driver)
if [ ${#browser_packages[@]} -gt 0 ]; then
  echo "setup: installing ${browser_packages[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${browser_packages[@]}" >/dev/null
fi

# The OCI tests: the CNCF distribution registry, and Node.js for building
# the JavaScript example with componentize-js.
registry_packages=()
command -v docker-registry >/dev/null || registry_packages+=(docker-registry)
command -v npm >/dev/null || registry_packages+=(nodejs npm)
if [ ${#registry_packages[@]} -gt 0 ]; then
  echo "setup: installing ${registry_packages[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # The package's service is not wanted: the tests start their own.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${registry_packages[@]}" >/dev/null
fi

# wkg, the Bytecode Alliance's package tool, at a pinned version, for the
# interop tests. A test tool: built without optimisation, which halves the
# build on two cores, in its own folder so it never touches ours. With
# WKG_BACKGROUND=1 (`make test`) it builds alongside the host's builds,
# filling the cores their serial phases leave idle; the interop test waits
# for it (.tools/wkg-building marks a build in progress).
WKG_VERSION=0.16.1
# A marker left by a build that was killed would block every later one.
if [ -d .tools/wkg-building ] && ! pgrep -f "cargo install .*wkg --version" >/dev/null; then
  rm -rf .tools/wkg-building .tools/wkg-build
fi
if [ "$(.tools/bin/wkg --version 2>/dev/null)" != "wkg $WKG_VERSION" ] && ! [ -d .tools/wkg-building ]; then
  mkdir -p .tools/wkg-building
  build_wkg() {
    local rc=0
    CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=false \
      CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_LTO=false \
      CARGO_TARGET_DIR="$PWD/.tools/wkg-build" \
      cargo install --quiet --locked --root .tools wkg --version "$WKG_VERSION" || rc=$?
    rm -rf .tools/wkg-build .tools/wkg-building
    return $rc
  }
  if [ "${WKG_BACKGROUND:-0}" = 1 ]; then
    echo "setup: building wkg $WKG_VERSION in the background (.tools/wkg-build.log)"
    (build_wkg > .tools/wkg-build.log 2>&1 &)
  else
    echo "setup: building wkg $WKG_VERSION (a few minutes, once)"
    build_wkg
  fi
fi
