#!/usr/bin/env bash
# Builds the test environment from the package registries: Kubernetes, etcd, kwok,
# metrics-server, helm, grpcurl and actionlint from the Go module proxy, the OCI registry from
# Debian; for the real node (tests/env/node.sh) the kubelet and kube-proxy, CoreDNS and a
# pause image from the Go module proxy, containerd, runc, the CNI plugins, iptables, nftables
# and buildah from Debian. Each component is cached by version
# under $DISTR_TESTENV_CACHE; a second run is a no-op. Prints the bin directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${DISTR_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distr-agent-testenv}
bin="$cache/bin"
mkdir -p "$bin"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { printf '[testenv] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# progress <what>: reads `go build -v` output (one package per line) and reports how far the
# build is every 250 packages; anything else (compiler errors) passes through.
progress() {
  local what=$1 n=0 line
  while IFS= read -r line; do
    case $line in
      *' '* | '#'*) printf '%s\n' "$line" >&2 ;;
      *) n=$((n + 1)); [ $((n % 250)) = 0 ] && log "$what: $n packages compiled" ;;
    esac
  done
  log "$what: $n packages compiled"
}

# What is being built and how far: each component says which of the $parts it is, and a
# build that takes minutes says every 30 s that it still runs (never a silent wait).
parts=13 part=0
component() { part=$((part + 1)); "$@"; }
building() { log "building $* (component $part of $parts)"; }
ticking() {
  local what=$1 rc=0
  shift
  (
    # The sleep is killed with the loop: a stray one would hold the caller's pipes open.
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    start=$SECONDS
    while :; do
      sleep 30 &
      nap=$!
      wait "$nap"
      log "$what: still building ($((SECONDS - start)) s so far)"
    done
  ) >/dev/null &
  local ticker=$!
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$rc"
}

# stamp <name> <version>: true when <name> was already built at <version>.
built() { [ -f "$cache/stamps/$1" ] && [ "$(cat "$cache/stamps/$1")" = "$2" ]; }
mark() { mkdir -p "$cache/stamps"; printf '%s' "$2" >"$cache/stamps/$1"; }

# kube_ldflags <version>: the version the Kubernetes commands report, as upstream's build sets it.
kube_ldflags() {
  local v=$1 minor p ld="-s -w"
  minor=${v#v1.}; minor=${minor%%.*}
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld+=" -X $p.buildDate=2026-01-01T00:00:00Z"
  done
  echo "$ld"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION minor
  built kubernetes "$v" && return
  building "Kubernetes $v (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)"
  local w="$cache/src/kubernetes-$v"
  rm -rf "$w" && mkdir -p "$w"
  # Upstream's go.mod replaces each staging module with a local path; a wrapper module must
  # replace them with the published k8s.io/X v0.<minor>.<patch> instead.
  local upstream_mod
  upstream_mod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  local staging_v="v0.${v#v1.}"
  {
    echo "module distr.local/testenv/kubernetes"
    grep -E '^(go|godebug) ' "$upstream_mod" || true
    echo "require k8s.io/kubernetes $v"
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 '"$staging_v"'#p' "$upstream_mod"
  } >"$w/go.mod"
  (
    cd "$w"
    # Name the version: a bare `go get` of a package would move k8s.io/kubernetes to the newest.
    log "downloading the Kubernetes modules"
    ticking "Kubernetes modules" go get "k8s.io/kubernetes/cmd/kube-apiserver@$v" "k8s.io/kubernetes/cmd/kube-controller-manager@$v" \
      "k8s.io/kubernetes/cmd/kube-scheduler@$v" "k8s.io/kubernetes/cmd/kubectl@$v"
    log "compiling Kubernetes (about 2,000 packages; a few minutes on 2 cores)"
    go build -v -trimpath -tags selinux,notest -ldflags "$(kube_ldflags "$v")" -o "$bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl 2>&1 | progress kubernetes
  )
  mark kubernetes "$v"
}

build_etcd() {
  local v=$ETCD_VERSION
  built etcd "$v" && return
  building "etcd $v"
  local w="$cache/src/etcd-$v"
  rm -rf "$w" && mkdir -p "$w"
  printf 'module distr.local/testenv/etcd\n\ngo 1.24\n' >"$w/go.mod"
  (
    cd "$w"
    ticking etcd go get "go.etcd.io/etcd/server/v3@$v" "go.etcd.io/etcd/etcdctl/v3@$v"
    ticking etcd go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
    ticking etcdctl go build -trimpath -ldflags "-s -w" -o "$bin/etcdctl" go.etcd.io/etcd/etcdctl/v3
  )
  mark etcd "$v"
}

# go_install <name> <package@version>
go_install() {
  built "$1" "$2" && return
  building "$2"
  ticking "$1" env GOBIN="$bin" go install -trimpath -ldflags "-s -w" "$2"
  mark "$1" "$2"
}

build_kwok() {
  go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # kwok refuses to start without Stage objects; they ship in its module. Take exactly the
  # ones that make Nodes Ready (with Lease heartbeats) and Pods Running/Ready, never the
  # "chaos" stages that fail nodes and pods on purpose.
  local stages out f
  stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  out="$cache/kwok/stages-$KWOK_VERSION.yaml"
  mkdir -p "$cache/kwok"
  : >"$out.tmp"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$stages/$f" ] || { log "kwok $KWOK_VERSION has no stage $f"; exit 1; }
    { echo "---"; cat "$stages/$f"; } >>"$out.tmp"
  done
  mv "$out.tmp" "$out"
  ln -sf "$(basename "$out")" "$cache/kwok/stages.yaml"
  # The CRDs of kwok's Logs and ClusterLogs: start.sh applies them and runs kwok with
  # --enable-crds, so a test configures a pod's logs by creating an object.
  local crds="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/crd/bases"
  out="$cache/kwok/crds-$KWOK_VERSION.yaml"
  : >"$out.tmp"
  for f in kwok.x-k8s.io_logs.yaml kwok.x-k8s.io_clusterlogs.yaml; do
    [ -f "$crds/$f" ] || { log "kwok $KWOK_VERSION has no CRD $f"; exit 1; }
    { echo "---"; cat "$crds/$f"; } >>"$out.tmp"
  done
  mv "$out.tmp" "$out"
  ln -sf "$(basename "$out")" "$cache/kwok/crds.yaml"
}

install_registry() {
  if [ -x /usr/bin/docker-registry ] && command -v htpasswd >/dev/null; then return; fi
  log "installing Debian's docker-registry and apache2-utils (htpasswd) (component $part of $parts)"
  # The package starts a daemon on :5000 when it is installed; forbid that, we run our own.
  local rc=/usr/sbin/policy-rc.d had=0
  [ -e "$rc" ] && had=1
  [ $had = 1 ] || printf '#!/bin/sh\nexit 101\n' | as_root tee "$rc" >/dev/null
  as_root chmod +x "$rc"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry apache2-utils >&2 ||
    { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry apache2-utils >&2; }
  [ $had = 1 ] || as_root rm -f "$rc"
}

# The project's own Go helper: renders deploy/manifest.yaml.tmpl with text/template, as the
# Hub does. Standard library only; rebuilt when its source changes.
build_render_manifest() {
  local src="$here/render-manifest" sum
  sum=$(cat "$src/go.mod" "$src/main.go" | sha256sum | cut -c1-16)
  built render-manifest "$sum" && [ -x "$bin/render-manifest" ] && return
  building render-manifest
  (cd "$src" && go build -trimpath -o "$bin/render-manifest" .)
  mark render-manifest "$sum"
}

# The real node's Debian packages. containerd's package would start its daemon: forbidden, as
# for the registry (the node runs its own, see node.sh).
install_node_packages() {
  local want=(containerd runc containernetworking-plugins iptables nftables conntrack buildah) missing=()
  local p
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return
  log "installing Debian's ${missing[*]} (component $part of $parts)"
  local rc=/usr/sbin/policy-rc.d had=0
  [ -e "$rc" ] && had=1
  [ $had = 1 ] || printf '#!/bin/sh\nexit 101\n' | as_root tee "$rc" >/dev/null
  as_root chmod +x "$rc"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 ||
    { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; }
  [ $had = 1 ] || as_root rm -f "$rc"
}

# The kubelet and kube-proxy, in the wrapper module of the control plane (build_kubernetes),
# at the same version. The kubelet needs go.sum entries the other commands do not: `go get` it.
build_kubernetes_node() {
  local v=$KUBERNETES_VERSION
  built kubernetes-node "$v" && return
  building "Kubernetes $v node (kubelet, kube-proxy)"
  (
    cd "$cache/src/kubernetes-$v"
    ticking "Kubernetes node modules" go get "k8s.io/kubernetes/cmd/kubelet@$v" "k8s.io/kubernetes/cmd/kube-proxy@$v" 2>&1 |
      sed '/^go: \(added\|downloading\|upgraded\) /d' >&2
    log "compiling the kubelet and kube-proxy (most packages are the control plane's, cached)"
    go build -v -trimpath -tags selinux,notest -ldflags "$(kube_ldflags "$v")" -o "$bin/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy 2>&1 | progress kubernetes-node
  )
  mark kubernetes-node "$v"
}

# go_wrapper <name> <dir of main.go> <go version> <package@version...>: builds the main package
# in <dir> (the project's own few lines around a module's packages) in a wrapper module that
# requires exactly those packages' modules at those versions.
go_wrapper() {
  local name=$1 src=$here/$2 go=$3 sum
  shift 3
  sum=$( (cat "$src/main.go"; echo "$*") | sha256sum | cut -c1-16)
  built "$name" "$sum" && [ -x "$bin/$name" ] && return
  building "$name ($*)"
  local w="$cache/src/$name"
  rm -rf "$w" && mkdir -p "$w"
  cp "$src/main.go" "$w/"
  printf 'module distr.local/testenv/%s\n\ngo %s\n' "$name" "$go" >"$w/go.mod"
  (
    cd "$w"
    ticking "$name modules" go get "$@" 2>&1 | sed '/^go: \(added\|downloading\|upgraded\) /d' >&2
    ticking "$name" go build -trimpath -ldflags "-s -w" -o "$bin/$name" .
  )
  mark "$name" "$sum"
}

build_coredns() {
  local v=$COREDNS_VERSION p pkgs=()
  for p in coremain plugin/bind plugin/cache plugin/errors plugin/kubernetes; do pkgs+=("github.com/coredns/coredns/$p@$v"); done
  go_wrapper coredns coredns 1.25.0 "${pkgs[@]}"
}

# The pod sandbox image: tests/env/pause as the only file of an image, written as an OCI
# archive by Debian's buildah (no daemon: vfs storage, chroot isolation).
build_pause() {
  local src=$here/pause sum out=$cache/node/pause.oci.tar
  sum=$(cat "$src/go.mod" "$src/main.go" "$src/Dockerfile" | sha256sum | cut -c1-16)
  built pause "$sum" && [ -f "$out" ] && return
  building "the pause image"
  local w="$cache/src/pause"
  rm -rf "$w" && mkdir -p "$w" "$cache/node"
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$w/pause" .)
  cp "$src/Dockerfile" "$w/"
  local storage=(--storage-driver vfs --root "$w/storage" --runroot "$w/run")
  as_root buildah "${storage[@]}" build --isolation chroot -q -t distr.local/testenv/pause:1 "$w" >/dev/null
  rm -f "$out"
  as_root buildah "${storage[@]}" push -q distr.local/testenv/pause:1 "oci-archive:$out:distr.local/testenv/pause:1"
  as_root rm -rf "$w/storage" "$w/run"
  mark pause "$sum"
}

component install_registry
component build_render_manifest
component build_etcd
component go_install helm "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
component go_install grpcurl "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
component go_install actionlint "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
component build_kwok
component go_install metrics-server "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION"
component build_kubernetes
component install_node_packages
component build_kubernetes_node
component build_coredns
component build_pause
log "test environment ready in $bin ($(du -sh "$cache" | cut -f1) cached)"
echo "$bin"
