#!/usr/bin/env bash
# Mutation testing with cargo-mutants (pinned; installed into .tools/ on
# first use) over the modules where a wrong branch is a security or
# correctness bug (FILES below): config validation, the allow-list and
# guarded resolver, the breaker and retry policy, body limits, redaction,
# canary verdicts and routing, reuse and retirement, registry verification. Each mutant is judged by the host's
# in-process tests (`cargo test -p berth-host --lib`: unit tests and the
# in-process server tests).
#
# Builds use the dev profile: dependencies are optimised
# (`profile.dev.package."*"`), berth-host is not, so a mutant rebuilds one
# crate at opt-level 0. The first run builds the dependencies once (about
# 15 minutes on 2 cores); each mutant then takes about a minute.
#
#   scripts/mutants.sh                        every mutant of FILES (hours: docs/mutants.md)
#   scripts/mutants.sh -f host/src/redact.rs  those files instead (any cargo-mutants flags)
#   scripts/mutants.sh --shard 1/16           a sixteenth of FILES' mutants
#   scripts/mutants.sh --in-diff FILE         the mutants of FILES a diff touches
#
# Writes target/mutants/mutants.out (or $MUTANTS_OUTPUT/mutants.out, for a
# second run beside the first) and the score to bench/MUTANTS.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
version=27.1.0
toolchain="+$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
bin=.tools/bin/cargo-mutants
if ! "$bin" mutants --version 2>/dev/null | grep -q "$version"; then
  echo "tools: installing cargo-mutants $version"
  cargo "$toolchain" install --locked --root .tools cargo-mutants --version "$version"
fi
# A target folder of its own for the baseline and every mutant (cargo-mutants
# copies the tree; cargo finds this folder), so dependencies are built once
# and the release folder of `make test` is left alone. The guests stay in
# the main one.
export BERTH_GUESTS_DIR="${CARGO_TARGET_DIR:-$root/target}/wasm32-wasip2/release"
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$root/target/mutants-build}"
# The release build's lint wrapper would make a mutant that only trips a
# lint look unviable.
unset RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
FILES=(
  host/src/config.rs 'host/src/config/*.rs'           # config validation
  host/src/outbound/resolve.rs                        # allow-list checks, guarded resolver
  host/src/outbound/breaker.rs host/src/outbound/policy.rs  # breaker, retries
  host/src/server/body.rs host/src/outbound/body.rs   # body limits
  host/src/redact.rs                                  # redaction
  host/src/canary.rs host/src/router.rs               # canary verdicts, routing
  host/src/runtime/reuse.rs                           # reuse and retirement
  host/src/registry.rs 'host/src/registry/*.rs'       # registry verification
)
args=("$@")
# Files of their own replace the list; other flags narrow it.
if ! printf '%s\n' "${args[@]}" | grep -qxE -- '-f|--file|--file=.*'; then
  for f in "${FILES[@]}"; do args+=(-f "$f"); done
  args+=(-e host/src/config/tests.rs)
fi
started=$(date +%s)
rc=0
out="${MUTANTS_OUTPUT:-target/mutants}"
"$bin" mutants --output "$out" "${args[@]}" || rc=$?
# 0: all caught; 2: some missed; 3: some timed out. Anything else failed.
case "$rc" in 0|2|3) ;; *) exit "$rc" ;; esac
python3 scripts/mutants_score.py "$out/mutants.out/outcomes.json" \
  "$(( $(date +%s) - started ))" "$*" | tee bench/MUTANTS.md
