# Berth: build, run and test. Every target installs what it needs first, so
# `make run` and `make test` work on a fresh machine.

SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
WASM_DIR := $(CARGO_TARGET_DIR)/wasm32-wasip2/release
GUEST_WORKSPACES := examples/Cargo.toml tests/guests/Cargo.toml

.PHONY: setup guests build run test lint unit e2e clean

## setup: install the toolchain pieces the build needs (idempotent)
setup:
	@./scripts/setup.sh

## guests: build the example modules and test fixtures for wasm32-wasip2
guests: setup
	@for ws in $(GUEST_WORKSPACES); do \
	  $(CARGO) build --release --locked --target wasm32-wasip2 --manifest-path $$ws || exit 1; \
	done

## build: build the host
build: setup
	$(CARGO) build --locked --bin berth

## run: build everything and serve the examples (traffic :8080, admin :9090)
run: guests build
	$(CARGO_TARGET_DIR)/debug/berth --config examples/berth.toml

## lint: formatting and clippy, host and guests
lint: setup
	$(CARGO) fmt --all --check
	@for ws in $(GUEST_WORKSPACES); do \
	  $(CARGO) fmt --all --check --manifest-path $$ws || exit 1; \
	done
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@for ws in $(GUEST_WORKSPACES); do \
	  $(CARGO) clippy --locked --target wasm32-wasip2 --manifest-path $$ws -- -D warnings || exit 1; \
	done

## test: everything CI runs: lint, unit and end-to-end tests
test: guests lint
	$(CARGO) test --locked --workspace

clean:
	$(CARGO) clean
