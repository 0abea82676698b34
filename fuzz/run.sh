#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a time each, with libFuzzer through cargo-fuzz
# on the nightly toolchain. Not part of the test command: `cargo test` replays every committed
# corpus and crash file instead (fuzz-targets/tests/replay.rs).
#
#   fuzz/run.sh [seconds-per-target] [target...]      default: 60 s, every target
#
# FUZZ_RUNS=N stops a target after N executions (if that comes before the time). A single
# allocation above 256 MiB is a finding (-malloc_limit_mb): every decoder bounds what it
# unpacks well below that. Temporary files (the config-directory target) go to /dev/shm.
#
# New interesting inputs go to target/fuzz-corpus/<target> (not committed); a crash is written
# to fuzz/artifacts/<target>/: fix it, and commit the file so the replay keeps it fixed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
seconds=${1:-60}
[ $# -gt 0 ] && shift
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
if [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
limits=(-malloc_limit_mb=256 -rss_limit_mb=2048)
if [ -n "${FUZZ_RUNS:-}" ]; then limits+=(-runs="$FUZZ_RUNS"); fi
for target in "${targets[@]}"; do
  work="$here/../target/fuzz-corpus/$target"
  mkdir -p "$work"
  printf '\n==> %s for %ss\n' "$target" "$seconds" >&2
  cargo +nightly fuzz run "$target" "$work" "corpus/$target" -- \
    -max_total_time="$seconds" -dict=keys.dict -print_final_stats=1 "${limits[@]}"
done
