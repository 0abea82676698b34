#!/usr/bin/env bash
# The agent's benchmark (see the README's "Benchmark" section). For each N: a fresh control
# plane with an audit log, the release binaries, N releases of a 3-Deployment chart set at once
# on a Hub simulator; prints one table per N and a summary, and writes them all to
# target/bench/<timestamp>.md.
#
#   bench/run.sh                 N = 20 and 100
#   bench/run.sh 20 100 500      any N
#
# Environment: BENCH_WINDOW_SECONDS (steady-state window, default 180),
# BENCH_INSTALL_TIMEOUT_SECONDS (give up an install or a wait for the steady state, default 1800).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(20 100)
started=$SECONDS
step() { printf '\n==> %s (%ss)\n' "$*" $((SECONDS - started)) >&2; }

step "test environment binaries (built once, cached)"
bin=$(bash tests/env/build.sh)

step "agent binaries as the images build them (deploy/build.sh), the benchmark in release mode"
agent_bin=$(bash deploy/build.sh -p agent-poller -p agent-executor -p agent-updater)
cargo build --release -p distr-agent-e2e --bins

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$root/target/bench/$stamp
mkdir -p "$out"
state=
trap '[ -z "$state" ] || bash tests/env/stop.sh "$state" >/dev/null 2>&1' EXIT
for n in "${sizes[@]}"; do
  step "N = $n: control plane with an audit log"
  state=$out/env-$n
  DISTR_TESTENV_AUDIT=1 DISTR_TESTENV_KUBE_API_QPS=200 bash tests/env/start.sh "$state" "$bin"
  step "N = $n: benchmark"
  DISTR_TESTENV="$state/env" DISTR_AGENT_BIN_DIR="$agent_bin" \
    "$root/target/release/bench" run --releases "$n" --out-dir "$out"
  bash tests/env/stop.sh "$state" >/dev/null 2>&1
  state=
done

step "summary"
"$root/target/release/bench" summary --out-dir "$out" --report "$root/target/bench/$stamp.md"
echo "report: target/bench/$stamp.md (logs and audit logs under target/bench/$stamp/)" >&2
