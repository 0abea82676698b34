#!/usr/bin/env bash
# The README's first command: builds what the agent needs (cached after the first run), starts
# a local control plane, a Hub simulator with two sample deployments, installs the agent from
# deploy/ and runs its three processes, then shows live what they do. Ctrl-C stops everything.
#
#   demo/run.sh           the live view
#   demo/run.sh --check   waits until both deployments are healthy, carries out what the live
#                         view suggests trying (new values, upgrade, a broken version,
#                         uninstall), then stops (the test command runs this)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
started=$SECONDS
step() { printf '\n==> %s (%ss)\n' "$*" $((SECONDS - started)) >&2; }

step "test environment: Kubernetes, etcd, kwok, helm, grpcurl, built from source once and cached (the longest step of a first run)"
bin=$(bash tests/env/build.sh)

step "agent binaries and the Hub simulator (cargo build)"
cargo build --workspace --bins

step "local control plane"
state=$root/target/demo
[ -f "$state/pids" ] && bash tests/env/stop.sh "$state" >/dev/null 2>&1
rm -rf "$state"
trap 'bash tests/env/stop.sh "$state" >/dev/null 2>&1' EXIT
bash tests/env/start.sh "$state" "$bin"

step "the agent"
DISTR_TESTENV="$state/env" DISTR_AGENT_BIN_DIR="$root/target/debug" "$root/target/debug/demo" "$@"
