#!/usr/bin/env bash
# Stops what start.sh started (and anything the harness recorded in the same pid file).
# usage: stop.sh <state-dir>
set -uo pipefail
state=${1:?usage: stop.sh <state-dir>}
[ -f "$state/pids" ] || exit 0
# Newest first: kwok and the controllers before the API server, the API server before etcd.
tac "$state/pids" | while read -r pid name; do
  kill "$pid" 2>/dev/null && printf '[testenv] stopped %s\n' "$name" >&2
done
sleep 1
tac "$state/pids" | while read -r pid _; do kill -9 "$pid" 2>/dev/null; done
if [ -f "$state/etcd-data-dir" ]; then rm -rf "$(cat "$state/etcd-data-dir")"; fi
: >"$state/pids"
