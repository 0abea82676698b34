#!/usr/bin/env bash
# Builds the agent's release binaries the way its images ship them and prints the directory
# that holds them. The images (tests/env/images.sh, the release workflow) and the benchmark
# all build through this script, so that what the benchmark measures is what a cluster runs.
#
#   deploy/build.sh -p agent-poller [-p agent-executor ...] [other cargo build arguments]
#
# On top of the release profile (Cargo.toml: size over speed):
# - glibc linked statically (`crt-static`): no shared libraries to map, about 2 MiB less
#   resident memory per process, and no LD_PRELOAD to honour. Name resolution still works:
#   a static glibc 2.36 (Debian 12) resolves through `files` and `dns` without loading a
#   module (checked with strace: it reads nsswitch.conf, /etc/hosts and resolv.conf and opens
#   no shared object); the images have no base and no modules, and their nsswitch.conf
#   (deploy/rootfs) names only those two. The binaries stay position-independent (static-pie,
#   ASLR intact);
# - relative relocations packed (`-z pack-relative-relocs`, DT_RELR, glibc 2.36 and later):
#   the loader no longer reads a relocation table of a few hundred KiB at start-up;
# - identical functions folded by the linker (`--icf=all`, where the linker is lld).
#
# `--target` is explicit so that these flags apply to the binaries only, not to build scripts
# and proc-macros (a proc-macro cannot be linked statically); the binaries land in
# target/<host triple>/release.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
triple=$(rustc -vV | sed -n 's/^host: //p')
var=CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS
flags="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs"
# rustc links x86_64 Linux binaries with its own lld, which folds identical code; other hosts
# link with the system's cc and GNU ld, which has no --icf.
[ "$triple" != x86_64-unknown-linux-gnu ] || flags="$flags -C link-arg=-Wl,--icf=all"
export "$var=$flags"
cargo build --release --target "$triple" "$@" >&2
echo "$PWD/target/$triple/release"
