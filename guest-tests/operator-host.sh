#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the disk image of the VM that plays an operator's stock Debian 13 host in
# guest-tests/operator_host.rs: setup.sh's trixie tree (QEMU 11.1 from
# trixie-backports) with systemd as init, AppArmor, and libvirt's system daemon
# (libvirt-daemon-system, libvirt 11.3) installed from Debian's packages as an
# operator installs them, plus the guest kernel's modules. Nothing of this project
# is in it: the test installs the project's .deb in the VM with dpkg -i.
# Prints the image's path (export it as VDP_OPERATOR_IMAGE). Run as root, after
# setup.sh; idempotent (a stamp per package list). Never touches the tree it starts
# from: the packages go into an overlay over it.
set -euo pipefail
cache=${VDP_GUEST_CACHE:-/var/tmp/vhost-device-pmem-guest}
lower=$cache/trixie
top=$cache/operator
root=$top/root
image=$top/host.img
# What an operator installs (and what the VM's init needs); the stamp changes with it.
packages="systemd systemd-sysv udev dbus kmod procps apparmor apparmor-utils \
libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients prometheus-node-exporter"
stamp=$top/.stamp-$(md5sum <"$0" | cut -c1-12)

log() { printf 'operator-host: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (overlay mount, chroot, apt-get)"
[ -x "$lower/usr/bin/qemu-system-x86_64" ] || die "run guest-tests/setup.sh first"
kroot=$cache/kernel/root
kver=$(ls "$kroot/lib/modules" | head -n1)
[ -n "$kver" ] || die "no guest kernel in $cache/kernel (run guest-tests/setup.sh)"

if [ -e "$stamp" ] && [ -e "$image" ]; then
  echo "$image"
  exit 0
fi

cleanup() {
  for d in dev/pts dev proc sys; do
    mountpoint -q "$root/$d" && umount -l "$root/$d"
  done
  mountpoint -q "$root" && umount "$root"
  return 0
}
trap cleanup EXIT

cleanup
rm -rf "$top"
mkdir -p "$top/upper" "$top/work" "$root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$top/upper,workdir=$top/work" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# No service starts in the chroot (the VM's systemd starts them at boot).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"

log "installing $packages (a few minutes)"
# shellcheck disable=SC2086
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
  "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages" \
  >"$cache/operator-install.log" 2>&1 \
  || { tail -30 "$cache/operator-install.log" >&2; die "package install failed (log: $cache/operator-install.log)"; }
chroot "$root" apt-get clean
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"

# The guest kernel's modules (the kernel itself boots from outside, as in every
# guest test), so udev and libvirt load what they need.
mkdir -p "$root/usr/lib/modules"
cp -a "$kroot/lib/modules/$kver" "$root/usr/lib/modules/"
depmod -b "$root/usr" "$kver" 2>/dev/null || chroot "$root" depmod "$kver"

# A host's identity: its name, its own machine id, its root in fstab.
echo operator-host >"$root/etc/hostname"
printf '127.0.1.1 operator-host\n' >>"$root/etc/hosts"
rm -f "$root/etc/machine-id"
chroot "$root" systemd-machine-id-setup >/dev/null
printf '/dev/vda / ext4 rw,errors=remount-ro 0 0\n' >"$root/etc/fstab"

for d in dev/pts dev proc sys; do umount -l "$root/$d"; done
log "making $image from the tree"
rm -f "$image.tmp"
truncate -s 6G "$image.tmp"
mkfs.ext4 -q -F -L operator-root -d "$root" "$image.tmp"
mv "$image.tmp" "$image"
umount "$root"
touch "$stamp"
log "ready: $image ($(du -h "$image" | cut -f1) used)"
echo "$image"
