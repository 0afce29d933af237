#!/usr/bin/env bash
# Builds the guest SDK for wasm32-wasip2 with the oldest toolchain its
# Cargo.toml declares (`rust-version`), so that claim stays true. The
# toolchain is installed with rustup on first use; its own target folder.
set -euo pipefail
cd "$(dirname "$0")/.."
msrv="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' guest-sdk/Cargo.toml)"
if ! rustup run "$msrv" rustc --version >/dev/null 2>&1 \
  || ! rustup target list --toolchain "$msrv" --installed | grep -qx wasm32-wasip2; then
  echo "sdk-msrv: installing Rust $msrv with wasm32-wasip2"
  rustup toolchain install "$msrv" --profile minimal --target wasm32-wasip2 >/dev/null
fi
# `make test` lints through the current toolchain's clippy-driver: not
# this toolchain's business.
for features in "" "--features=p3" "--features=grpc"; do
  env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS CARGO_TARGET_DIR="$PWD/.tools/msrv-target" \
    cargo "+$msrv" build --locked --quiet -p berth-sdk --target wasm32-wasip2 $features
done
echo "sdk-msrv: berth-sdk builds with Rust $msrv for wasm32-wasip2"
