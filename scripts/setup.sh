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
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "setup: installing ${apt_packages[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
