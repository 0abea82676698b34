#!/usr/bin/env bash
# Stops what start.sh started (and anything the harness recorded in the same pid file), then
# removes what the real node leaves on the host (tests/env/node.sh) and says whether anything
# of it is left.
# usage: stop.sh <state-dir>
set -uo pipefail
state=${1:?usage: stop.sh <state-dir>}
[ -f "$state/pids" ] || exit 0
state=$(cd "$state" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=node.sh
source "$here/node.sh"
# Newest first: the node's processes, kwok and the controllers before the API server, the API
# server before etcd.
tac "$state/pids" | while read -r pid name; do
  kill "$pid" 2>/dev/null && printf '[testenv] stopped %s\n' "$name" >&2
done
# The policy engine removes its nftables table when it stops; give each process a few seconds.
for _ in 1 2 3 4 5 6; do
  alive=0
  while read -r pid _; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$state/pids"
  [ $alive = 0 ] && break
  sleep 0.5
done
tac "$state/pids" | while read -r pid _; do kill -9 "$pid" 2>/dev/null; done
if [ -f "$state/etcd-data-dir" ]; then rm -rf "$(cat "$state/etcd-data-dir")"; fi
rc=0
node_stop || rc=1
: >"$state/pids"
exit $rc
