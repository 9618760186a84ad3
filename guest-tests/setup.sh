#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Installs everything the guest tests need, from scratch, into a cache directory:
#   - a debootstrap'd Debian trixie tree with QEMU >= 11.1 from trixie-backports
#     (the host's Debian 12 QEMU cannot host a vhost-user pmem device);
#   - a Debian 6.12 cloud guest kernel, unpacked with dpkg -x (never installed);
#   - a busybox initramfs that loads the virtio-pmem modules and runs a test script.
# Idempotent: each step leaves a stamp and is skipped when its stamp exists.
# Prints `export` lines for the paths it made on stdout's last lines (see env.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
CACHE=${VDP_GUEST_CACHE:-/var/tmp/vhost-device-pmem-guest}
ROOT=$CACHE/trixie
KDIR=$CACHE/kernel
mkdir -p "$CACHE"

log() { printf 'guest-setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, apt-get)"
# The Debian mirror this machine's apt uses: deb822 sources first, then one-line ones.
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | tr ' ' '\n' | grep -v -- -security | grep . | head -n1 || true)
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; exit } }' \
    | grep -v -- -security | head -n1 || true)
fi
[ -n "$mirror" ] || die "no Debian mirror found in the apt configuration"

# Host tools.
need=()
for t in debootstrap:debootstrap busybox:busybox-static cpio:cpio xz:xz-utils zstd:zstd \
         mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs strace:strace dmsetup:dmsetup depmod:kmod file:file; do
  command -v "${t%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${t%%:*}" ] || need+=("${t#*:}")
done
# busybox-static specifically (a dynamic busybox cannot run in the initramfs).
file -L "$(command -v busybox 2>/dev/null || echo /nonexistent)" 2>/dev/null | grep -q 'statically linked' \
  || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  log "installing host packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" file >&2
fi

# 1. trixie tree with QEMU from trixie-backports.
if [ ! -e "$ROOT/.stamp-qemu" ]; then
  rm -rf "$ROOT"
  log "debootstrap trixie into $ROOT (a few minutes)"
  debootstrap --variant=minbase trixie "$ROOT" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  printf 'deb %s trixie main\ndeb %s trixie-backports main\n' "$mirror" "$mirror" >"$ROOT/etc/apt/sources.list"
  log "installing qemu-system-x86 from trixie-backports"
  chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86 ' \
    >"$CACHE/qemu-install.log" 2>&1 \
    || { tail -20 "$CACHE/qemu-install.log" >&2; die "QEMU install failed (log: $CACHE/qemu-install.log)"; }
  chroot "$ROOT" apt-get clean
  touch "$ROOT/.stamp-qemu"
fi
qver=$(chroot "$ROOT" qemu-system-x86_64 --version | head -n1)
log "QEMU in chroot: $qver"

# 2. Guest kernel (Debian 12's 6.12 cloud kernel), unpacked, never installed.
if [ ! -e "$KDIR/.stamp" ]; then
  rm -rf "$KDIR"; mkdir -p "$KDIR/deb"
  apt-get update -qq
  pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' \
        | awk '{print $1}' | sort -V | tail -n1)
  [ -n "$pkg" ] || die "no linux-image-6.12.*-cloud-amd64 in the apt lists"
  log "downloading guest kernel $pkg"
  (cd "$KDIR/deb" && apt-get download -qq "$pkg" >&2)
  dpkg -x "$KDIR"/deb/*.deb "$KDIR/root"
  rm -rf "$KDIR/deb"
  touch "$KDIR/.stamp"
fi
kver=$(ls "$KDIR/root/lib/modules" | head -n1)
vmlinuz=$KDIR/root/boot/vmlinuz-$kver
[ -r "$vmlinuz" ] || die "no vmlinuz in $KDIR"

# 3. Base initramfs: busybox, the pmem modules (and their dependencies), /init.
"$here/mkinitramfs.sh" "$KDIR/root" "$kver" "$CACHE/initramfs.cpio"

# 4. Accelerator: KVM where it really boots this kernel (this host's /dev/kvm may be a
# PVM implementation that cannot), TCG otherwise. Probed once per kernel and host.
accel_file=$CACHE/accel-$(uname -r)-$kver
if [ ! -e "$accel_file" ]; then
  accel=tcg
  if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    probe=$(mktemp -d)
    printf '#!/bin/sh\necho VDP-KVM-OK\n' >"$probe/test.sh"; chmod +x "$probe/test.sh"
    (cd "$probe" && echo test.sh | cpio -o -H newc --quiet >extra.cpio)
    cat "$CACHE/initramfs.cpio" "$probe/extra.cpio" >"$probe/initrd"
    if timeout 25 "$ROOT/lib64/ld-linux-x86-64.so.2" \
         --library-path "$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu" \
         "$ROOT/usr/bin/qemu-system-x86_64" -L "$ROOT/usr/share/qemu" -L "$ROOT/usr/share/seabios" \
         -machine q35,accel=kvm -cpu host -m 256M -nodefaults -display none -serial stdio -no-reboot \
         -kernel "$vmlinuz" -initrd "$probe/initrd" -append "console=ttyS0 quiet panic=-1" \
         2>&1 | grep -q VDP-KVM-OK; then
      accel=kvm
    fi
    rm -rf "$probe"
  fi
  echo "$accel" >"$accel_file"
fi
accel=$(cat "$accel_file")
log "guest accelerator: $accel (KVM is used only where it really boots the guest kernel)"

cat >"$CACHE/env.sh" <<ENV
# generated by guest-tests/setup.sh
VDP_QEMU_ROOT=$ROOT
VDP_KERNEL=$vmlinuz
VDP_INITRAMFS=$CACHE/initramfs.cpio
VDP_QEMU_VERSION="$qver"
VDP_ACCEL=$accel
ENV
log "ready: $CACHE/env.sh"
