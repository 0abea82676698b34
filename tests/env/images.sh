#!/usr/bin/env bash
# Builds the agent's three container images from the current source without a container
# daemon, and writes each as an OCI archive that `ctr -n k8s.io images import` takes:
#   1. deploy/build.sh: the static release binaries;
#   2. deploy/context.sh: the build context (those binaries, the environment's helm, the root
#      files), as the release workflow assembles it per architecture;
#   3. Debian's buildah (vfs storage, chroot isolation: no daemon, no overlay mount) on
#      deploy/{poller,executor,updater}.Dockerfile.
# Prints each image's size (stderr) and the archives' paths (stdout, one a line). Cached by
# the hash of everything that goes into the images: with nothing changed, a run is cargo's
# no-op check and a hash, a few seconds. Needs root (buildah; apt-get when it is missing).
#
#   tests/env/images.sh <bin dir> <out dir> <tag> [<tag> ...]
#
# <bin dir> is what tests/env/build.sh prints; its helm (HELM_VERSION) goes into the executor
# image. Each image is named as deploy/manifest.yaml.tmpl renders it, <repo>/<name>:<tag> with
# <repo> read from the template and <tag> the agentVersion the manifest is rendered with; each
# further tag names the same image once more in the same archive (a "new version" for a
# self-update test). Writes <out>/{poller,executor,updater}.oci.tar.
set -euo pipefail

[ $# -ge 3 ] || { echo "usage: $0 <test env bin dir> <out dir> <tag> [<tag> ...]" >&2; exit 2; }
bin=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
shift 2
tags=("$@")
# One build at a time per output directory.
exec 9>"$out/.lock"
flock 9
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
names=(poller executor updater)

log() { printf '[images] %s\n' "$*" >&2; }
started=$SECONDS
step_start=$SECONDS
timed() { log "$1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }

# shellcheck disable=SC2016 # the template's own `$repo`
repo=$(sed -n 's/.*\$repo := "\([^"]*\)".*/\1/p' "$root/deploy/manifest.yaml.tmpl")
[ -n "$repo" ] || { log "no \$repo in deploy/manifest.yaml.tmpl"; exit 1; }
for tag in "${tags[@]}"; do
  [[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { log "not an image tag: '$tag'"; exit 2; }
done
case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) log "no image for $(uname -m)"; exit 1 ;;
esac

if ! command -v buildah >/dev/null; then
  log "installing Debian's buildah"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q buildah >&2 || { apt-get update -q >&2 && apt-get install -y -q buildah >&2; }
  timed "buildah installed"
fi

# `helm version` names only the minor version of a `go install`ed helm; its build info has it all.
helm_version=$(go version -m "$bin/helm" | awk '$1 == "mod" && $2 == "helm.sh/helm/v4" { print $3 }')
[ "$helm_version" = "$HELM_VERSION" ] ||
  { log "$bin/helm is $helm_version, versions.env says $HELM_VERSION (run tests/env/build.sh)"; exit 1; }

bins=$(bash "$root/deploy/build.sh" --locked -p agent-poller -p agent-executor -p agent-updater)
timed "release binaries built (deploy/build.sh)"

ctx=$out/context
rm -rf "$ctx"
bash "$root/deploy/context.sh" "$ctx" "$arch" "$bins" "$bin/helm"

# What the images are made of: the context (names, modes, contents), the Dockerfiles, the
# scripts that assemble and build them, and the names.
key=$(
  cd "$ctx"
  find . -printf '%p %m\n' | LC_ALL=C sort
  find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  cd "$root"
  sha256sum deploy/*.Dockerfile deploy/context.sh tests/env/images.sh
  echo "$repo ${tags[*]} $arch"
)
key=$(sha256sum <<<"$key" | cut -c1-32)
timed "context assembled, input hash $key"

report() {
  local name size
  for name in "${names[@]}"; do
    size=$(stat -c %s "$out/$name.oci.tar")
    log "$name: $(numfmt --to=iec-i --suffix=B "$(cat "$out/$name.unpacked")") unpacked," \
      "$(numfmt --to=iec-i --suffix=B "$size") as archive; $repo/$name:${tags[0]}"
  done
  log "done in $((SECONDS - started)) s"
  for name in "${names[@]}"; do echo "$out/$name.oci.tar"; done
}

cached=1
for name in "${names[@]}"; do [ -s "$out/$name.oci.tar" ] && [ -s "$out/$name.unpacked" ] || cached=0; done
if [ $cached = 1 ] && [ "$(cat "$out/images.key" 2>/dev/null)" = "$key" ]; then
  log "images unchanged (cached)"
  report
  exit 0
fi
rm -f "$out/images.key"

# A private store, thrown away after: nothing of it is needed once the archives exist, and no
# other user of buildah on the machine sees it.
store=$out/buildah
rm -rf "$store"
trap 'rm -rf "$store"' EXIT
storage=(--root "$store/root" --runroot "$store/run" --storage-driver vfs)
for name in "${names[@]}"; do
  image=$repo/$name:${tags[0]}
  # One layer per instruction, as docker buildx makes them: the root files' layer is the same
  # blob in all three images.
  if ! buildah "${storage[@]}" build --isolation chroot --layers --platform "linux/$arch" \
    -f "$root/deploy/$name.Dockerfile" -t "$image" "$ctx" >"$store/$name.log" 2>&1; then
    cat "$store/$name.log" >&2
    log "building $image failed"
    exit 1
  fi
  # An OCI layout holding the image under each of its names, then archived as it is.
  layout=$store/$name.oci
  for tag in "${tags[@]}"; do
    buildah "${storage[@]}" push -q "$image" "oci:$layout:$repo/$name:$tag" >/dev/null
  done
  tar -C "$layout" --sort=name -cf "$out/$name.oci.tar.tmp" oci-layout index.json blobs
  mv "$out/$name.oci.tar.tmp" "$out/$name.oci.tar"
  # Unpacked: what the root filesystem holds (the files the Dockerfile copies).
  case $name in
    executor) files=("$ctx/$arch/agent-executor" "$ctx/$arch/helm") ;;
    *) files=("$ctx/$arch/agent-$name") ;;
  esac
  du -cb "$ctx/rootfs" "${files[@]}" | tail -1 | cut -f1 >"$out/$name.unpacked"
  timed "$image built and archived"
done
echo "$key" >"$out/images.key"
report
