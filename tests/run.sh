#!/usr/bin/env bash
# The project's test command: formatting, lints, unit tests and end-to-end tests against a
# real control plane, helm and OCI registry, all built here from the package registries.
# Needs only Rust (rustup), Go and apt-get; installs the rest and caches it by version.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
started=$SECONDS
step() { printf '\n==> %s (%ss)\n' "$*" $((SECONDS - started)) >&2; }

step "toolchain components"
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "test environment (built once, cached by version)"
bin=$(bash tests/env/build.sh)

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "build the agent binaries"
cargo build --workspace --bins

step "start the control plane"
state=$root/target/testenv
rm -rf "$state"
trap 'bash tests/env/stop.sh "$state"' EXIT
bash tests/env/start.sh "$state" "$bin"

step "unit and end-to-end tests"
export DISTR_TESTENV="$state/env"
export DISTR_AGENT_BIN_DIR="$root/target/debug"
cargo test --workspace --no-fail-fast -- --test-threads "${DISTR_TEST_THREADS:-4}"

step "all checks passed"
