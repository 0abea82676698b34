#!/usr/bin/env bash
# Assembles the build context of the three images (deploy/*.Dockerfile) for one architecture.
# The release workflow calls it once per architecture into the same directory, and
# `docker buildx` picks each platform's binaries by TARGETARCH; the test environment calls it
# for the host (tests/env/images.sh) and builds with buildah.
#
#   deploy/context.sh <context dir> <arch: amd64|arm64> <dir of the agent binaries> <helm binary>
#
# The binaries directory is what deploy/build.sh prints. Layout written:
#   <context>/rootfs/   deploy/rootfs (passwd, group, nsswitch.conf), an empty /tmp and the
#                       build host's CA bundle at /etc/ssl/certs/ca-certificates.crt
#   <context>/<arch>/   agent-poller, agent-executor, agent-updater, helm
# The images have no base: every binary must be static (no ELF interpreter), checked here.
set -euo pipefail

[ $# = 4 ] || { echo "usage: $0 <context dir> <amd64|arm64> <agent binaries dir> <helm binary>" >&2; exit 2; }
ctx=$1 arch=$2 bins=$3 helm=$4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case $arch in
  amd64) machine='X86-64' ;;
  arm64) machine='AArch64' ;;
  *) echo "unsupported architecture: $arch" >&2; exit 2 ;;
esac
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] || { echo "no CA bundle at $ca (install ca-certificates, or set CA_BUNDLE)" >&2; exit 1; }

mkdir -p "$ctx"
rm -rf "${ctx:?}/rootfs" "${ctx:?}/$arch"
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp" "$ctx/$arch"
install -m 0644 "$here"/rootfs/etc/* "$ctx/rootfs/etc/"
install -m 0644 "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
find "$ctx/rootfs" -type d -exec chmod 0755 {} +
# The mount point of the executor's scratch emptyDir; read-only elsewhere.
chmod 1777 "$ctx/rootfs/tmp"

for name in agent-poller agent-executor agent-updater helm; do
  f=$bins/$name
  [ $name != helm ] || f=$helm
  header=$(readelf -h -l "$f" 2>/dev/null) || { echo "$f: not an ELF binary" >&2; exit 1; }
  grep -q "Machine:.*$machine" <<<"$header" || { echo "$f: not built for $arch" >&2; exit 1; }
  ! grep -q 'INTERP' <<<"$header" || { echo "$f: dynamically linked (the images have no libraries)" >&2; exit 1; }
  install -m 0555 "$f" "$ctx/$arch/$name"
done
