#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Makes a fresh Debian trixie minbase tree at DEST for the package test: debootstraps
# once from the mirror the host's apt names and caches the pristine tree as a tarball
# under /var/tmp; every later call only extracts it. Never installs anything into DEST.
set -euo pipefail

DEST=${1:?usage: fresh-debian-root.sh DEST}
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${VDP_DEB_CACHE:-/var/tmp/vhost-device-pmem-deb}
TARBALL=$CACHE/trixie-minbase.tar

log() { printf 'fresh-debian-root: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
[ ! -e "$DEST" ] || [ -z "$(ls -A "$DEST")" ] || die "$DEST exists and is not empty"
mkdir -p "$CACHE" "$DEST"

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || {
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
  }
  mirror=$("$here/debian-mirror.sh") || die "no Debian mirror found in the apt configuration"
  build=$(mktemp -d "$CACHE/build.XXXXXX")
  trap 'rm -rf "$build"' EXIT
  log "debootstrap trixie minbase from $mirror (a few minutes, once)"
  debootstrap --variant=minbase trixie "$build/root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  chroot "$build/root" apt-get clean
  tar -C "$build/root" --numeric-owner -cf "$build/trixie.tar" .
  mv "$build/trixie.tar" "$TARBALL"
fi
tar -C "$DEST" --numeric-owner -xf "$TARBALL"
log "fresh trixie tree in $DEST"
