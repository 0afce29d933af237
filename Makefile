# Berth: build, run and test. Every target installs what it needs first, so
# `make run` and `make test` work on a fresh machine.

SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
# Everything here builds the release profile: the Dockerfile's builder stage
# does, and the image check shares this target folder as its cache mount, so
# the tests, `make run` and the image reuse one set of compiled dependencies
# instead of building wasmtime twice.
export BERTH_BIN := $(CARGO_TARGET_DIR)/release/berth
WASM_DIR := $(CARGO_TARGET_DIR)/wasm32-wasip2/release
GUEST_WORKSPACES := examples/Cargo.toml tests/guests/Cargo.toml

.PHONY: setup k8s-tools wasmtime conformance guests sdk-js-test build run test lint lint-static chart-check image image-check smoke_test bench mutants clean

## setup: install the toolchain pieces the build needs (idempotent)
setup:
	@./scripts/setup.sh

## wasmtime: wasmtime-cli of the pinned release, optimised, into .tools/ (bench)
wasmtime:
	@./scripts/wasmtime.sh

## guests: build the example modules and test fixtures for wasm32-wasip2
guests: setup $(WASM_DIR)/js-hello.wasm
	@for ws in $(GUEST_WORKSPACES); do \
	  $(CARGO) build --release --locked --target wasm32-wasip2 --manifest-path $$ws || exit 1; \
	done

## The JavaScript example, built with componentize-js (pinned in its
## package-lock.json) from the npm registry; rebuilt only when it changes.
JS_HELLO := examples/js-hello
$(WASM_DIR)/js-hello.wasm: $(JS_HELLO)/hello.js $(JS_HELLO)/package-lock.json $(wildcard $(JS_HELLO)/wit/*.wit $(JS_HELLO)/wit/deps/*.wit)
	@mkdir -p $(WASM_DIR)
	cd $(JS_HELLO) && npm ci --no-audit --no-fund --loglevel=error
	cd $(JS_HELLO) && OUT=$(WASM_DIR)/js-hello.wasm.part npm run --silent build
	mv $(WASM_DIR)/js-hello.wasm.part $@

## build: build the host
build: setup
	$(CARGO) build --release --locked --bin berth

## run: build everything and serve the examples (traffic :8080, admin :9090)
run: guests build
	$(BERTH_BIN) --config examples/berth.toml

## lint: formatting and clippy, host and guests
lint: lint-static
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@for ws in $(GUEST_WORKSPACES); do \
	  $(CARGO) clippy --locked --target wasm32-wasip2 --manifest-path $$ws -- -D warnings || exit 1; \
	done

## lint-static: the layer check and formatting (no compiling)
lint-static: setup
	python3 scripts/check_layers.py
	$(CARGO) fmt --all --check
	@for ws in $(GUEST_WORKSPACES); do \
	  $(CARGO) fmt --all --check --manifest-path $$ws || exit 1; \
	done

## k8s-tools: helm, checkov, kubernetes-validate, hadolint into .tools/
k8s-tools:
	@./scripts/k8s-tools.sh

## chart-check: helm lint/template, Kubernetes schemas, security scans, chart
## tests, gRPC clients against the greeter example, and the views (dashboard
## and alerts against a real Prometheus,
## status page in headless Chromium)
chart-check: k8s-tools build
	.tools/venv/bin/pytest -q tests/chart tests/scripts tests/observe tests/grpc
	@# A run of its own: the SDK's `tests` package and the chart tests'
	@# modules must not share one pytest session's import paths. No
	@# bytecode or cache files: the SDK's folder is embedded by host/build.rs,
	@# and a new file there would rebuild the host.
	PYTHONDONTWRITEBYTECODE=1 .tools/venv/bin/pytest -q -p no:cacheprovider guest-sdk/python/tests

## image: build the image with docker, podman or buildah (IMAGE=registry/repo:tag,
## PUSH=1 to push and print the digest to pin; ENGINE= to choose)
image:
	@./scripts/image.sh

## image-check: build the image from the Dockerfile (emulated engine) and run it as the chart's pod
image-check: k8s-tools
	.tools/venv/bin/python scripts/image_check.py

## smoke_test: check a running deployment (TARGET_URL=... ADMIN_URL=... [SMOKE_PATH=/hello])
smoke_test:
	@./scripts/smoke_test.sh

## test: everything CI runs: lint, unit and end-to-end tests, chart and image checks
##
## Clippy runs inside the release builds rather than as `cargo clippy`:
## clippy-driver as the workspace wrapper lints our crates (all targets the
## tests build, with -D warnings) while compiling them, and the dependencies
## are the release build's. `cargo clippy` would first check-build every
## dependency again, wasmtime included: about nine minutes of a cold CI run.
test: export WKG_BACKGROUND := 1
test: export WASMTIME_BACKGROUND := 1
test: lint-static k8s-tools
	@./scripts/wasmtime.sh test
	@export RUSTC_WORKSPACE_WRAPPER="$$(rustup which clippy-driver)" \
	  CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"; \
	  $(MAKE) --no-print-directory guests \
	  && ./scripts/sdk-msrv.sh \
	  && $(MAKE) --no-print-directory sdk-js-test \
	  && $(CARGO) test --release --locked --workspace --features berth-sdk/grpc \
	  && $(MAKE) --no-print-directory chart-check image-check

## sdk-js-test: the JavaScript/TypeScript SDK's own tests (node --test) and
## its types (tsc --strict), with its pinned tools
sdk-js-test:
	cd guest-sdk/js && npm ci --no-audit --no-fund --loglevel=error && npm test --silent && npm run --silent typecheck

## conformance: the same WASI 0.3 fixture under berth and `wasmtime serve` gives the same answers
conformance: guests
	@./scripts/wasmtime.sh test
	$(CARGO) test --release --locked -p berth-host --test e2e conformance

## mutants: mutation testing of the security- and correctness-critical modules
## (.cargo/mutants.toml) against the in-process tests; writes bench/MUTANTS.md.
## MUTANTS_ARGS passes cargo-mutants flags (e.g. "-f host/src/redact.rs",
## "--in-diff change.diff", "--shard 1/8"); docs/mutants.md says how long.
mutants: guests
	./scripts/mutants.sh $(MUTANTS_ARGS)

## bench: berth against wasmtime serve and native hyper; writes bench/RESULTS.md
bench: setup
	./bench/run.sh

clean:
	$(CARGO) clean
