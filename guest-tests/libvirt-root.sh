#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Prepares the root the libvirt guest test runs in: an overlay over setup.sh's trixie
# tree (left untouched) with libvirt's QEMU driver and clients installed, and /proc,
# /sys, /dev bound in. Prints the root to export as VDP_LIBVIRT_ROOT. Run as root,
# after setup.sh; idempotent. Never touches the tree it overlays.
set -euo pipefail
cache=${VDP_GUEST_CACHE:-/var/tmp/vhost-device-pmem-guest}
lower=$cache/trixie
top=$cache/libvirt
root=$top/root
[ -x "$lower/usr/bin/qemu-system-x86_64" ] || { echo "run guest-tests/setup.sh first" >&2; exit 1; }
mkdir -p "$top/upper" "$top/work" "$root"
if ! mountpoint -q "$root"; then
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$top/upper,workdir=$top/work" "$root"
fi
for d in proc sys dev; do
  mountpoint -q "$root/$d" || mount --rbind "/$d" "$root/$d"
done
if [ ! -x "$root/usr/bin/virt-qemu-run" ]; then
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libvirt-daemon-driver-qemu libvirt-clients' >"$top/apt.log" 2>&1 \
    || { tail -20 "$top/apt.log" >&2; exit 1; }
fi
echo "$root"
