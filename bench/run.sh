#!/usr/bin/env bash
# `make bench`: installs what the benchmark needs (wrk from Debian,
# wasmtime-cli 50.0.1 from crates.io into .tools/), builds everything in
# release mode, and runs bench/oci.py, bench/canary.py, bench/http2.py and
# bench/bench.py, which write bench/RESULTS.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk nghttp2-client >/dev/null
fi
# grpcio, to check each gRPC server answers before it is loaded.
./scripts/k8s-tools.sh
./scripts/wasmtime.sh
make guests
cargo build --release --locked --bin berth
cargo build --release --locked -p native-hello
cargo build --release --locked --manifest-path bench/native-grpc/Cargo.toml
make conformance
python3 bench/oci.py
python3 bench/canary.py
.tools/venv/bin/python bench/http2.py
exec python3 bench/bench.py
