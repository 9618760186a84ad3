#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the Debian packages vhost-device-pmem and vhost-device-pmem-agent with
# cargo-deb (installed with `cargo install` when missing). Generates the man pages and
# completions from the clap definitions into target/assets/ first. Prints the paths
# of the two .deb files; never installs them.
#
#   packaging/build-deb.sh [--deb-version VERSION] [--output DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
deb_version=()
out=${CARGO_TARGET_DIR:-target}/debian
while [ $# -gt 0 ]; do
  case $1 in
    --deb-version) deb_version=(--deb-version "$2"); shift 2 ;;
    --output) out=$2; shift 2 ;;
    *) echo "usage: $0 [--deb-version VERSION] [--output DIR]" >&2; exit 2 ;;
  esac
done

log() { printf 'build-deb: %s\n' "$*" >&2; }

if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb $CARGO_DEB_VERSION (cargo install, a few minutes, once)"
  cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" >&2
fi
# dpkg-shlibdeps works out the library dependencies ("$auto"); dpkg-dev has it.
command -v dpkg-shlibdeps >/dev/null 2>&1 || {
  log "installing dpkg-dev (dpkg-shlibdeps)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >&2
}

log "building the release binaries"
cargo build --quiet --locked --release --bin vhost-device-pmem --bin vhost-device-pmem-agent >&2

log "generating man pages and completions into target/assets/"
rm -rf target/assets
cargo run --quiet --locked --release --bin vhost-device-pmem -- generate-docs --out target/assets >&2
gzip -9n target/assets/man/*.1

mkdir -p "$out"
log "packaging into $out"
daemon=$(cargo deb --quiet --locked --no-build "${deb_version[@]}" --output "$out")
agent=$(cargo deb --quiet --locked --no-build --variant agent "${deb_version[@]}" --output "$out")
echo "$daemon"
echo "$agent"
