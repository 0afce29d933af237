#!/usr/bin/env bash
# Installs what building and testing Berth needs, skipping what is there.
set -euo pipefail

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
