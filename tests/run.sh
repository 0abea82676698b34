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

step "actionlint (.github/workflows)"
"$bin/actionlint" .github/workflows/*.yml

step "container images (tests/env/images.sh: cached by input hash)"
# Tagged with the crate version, as the real-node tests render the manifest
# (tests/src/real_node.rs: AGENT_VERSION), and once more as "next": a new version of the same
# images for the self-update test (NEXT_AGENT_VERSION).
images=$(bash tests/env/images.sh "$bin" "$root/target/images" "$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" next | tr '\n' ' ')

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "build the agent binaries"
cargo build --workspace --bins

step "start the control plane and the real node"
state=$root/target/testenv
[ -f "$state/pids" ] && bash tests/env/stop.sh "$state" >/dev/null 2>&1
rm -rf "$state"
trap 'bash tests/env/stop.sh "$state"' EXIT
# The real node (tests/env/node.sh) runs the agent's images as pods for tests/tests/real_node.
DISTR_TESTENV_REAL_NODE=${DISTR_TESTENV_REAL_NODE:-1} DISTR_TESTENV_NODE_IMAGES="$images" \
  bash tests/env/start.sh "$state" "$bin"

step "unit and end-to-end tests"
export DISTR_TESTENV="$state/env"
export DISTR_AGENT_BIN_DIR="$root/target/debug"
cargo test --workspace --no-fail-fast -- --test-threads "${DISTR_TEST_THREADS:-4}"

step "no process of the run outlives it"
# Every process the tests start (the agent binaries, the helm processes of the executors, the
# Hub simulator of the demo) keeps its files under $state/tests: its command line or its
# environment names that directory. None may still run now; a process that dies with its test
# only once a timeout of its own expires (a helm install waiting an hour) is a leak. The pattern
# is read from a file so that grep's own command line does not hold it.
pattern=$state/leftover-pattern
printf '%s\n' "$state/tests/" >"$pattern"
leftovers() {
  local dir
  for dir in /proc/[0-9]*; do
    [ "${dir#/proc/}" = "$$" ] && continue
    if grep -qsaF -f "$pattern" "$dir/cmdline" "$dir/environ"; then echo "${dir#/proc/}"; fi
  done
}
# A process killed at a test's end may take a moment to go.
for _ in $(seq 50); do
  left=$(leftovers)
  [ -z "$left" ] && break
  sleep 0.2
done
if [ -n "$left" ]; then
  echo "these processes of the run are still running (killed now):" >&2
  for pid in $left; do
    printf '  %s: %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-300)" >&2
  done
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null || true
  exit 1
fi
echo "no process of the run left" >&2

step "no secret in any log of the run"
# Every target secret, JWT and registry password the harness made or issued is listed in
# $state/secrets; the agent processes logged at debug level (and the Hub simulators of the
# demo) must hold none of them.
secrets=$state/all-secrets
for run in "$state" "$root/target/demo"; do
  if [ -f "$run/secrets" ]; then cat "$run/secrets"; fi
  if [ -f "$run/env" ]; then grep '^DISTR_TESTENV_REGISTRY_PASSWORD=' "$run/env" | cut -d= -f2-; fi
done | awk 'length($0) >= 12' | sort -u >"$secrets"
logs=$(find "$state/tests" "$root/target/demo/tests" -name '*.log' 2>/dev/null || true)
if [ -n "$logs" ] && leaked=$(echo "$logs" | xargs grep -lF -f "$secrets"); then
  echo "these logs hold a secret of the run (not printed):" >&2
  echo "$leaked" >&2
  exit 1
fi
echo "$(echo "$logs" | wc -l) logs checked against $(wc -l <"$secrets") secrets" >&2

step "all checks passed"
