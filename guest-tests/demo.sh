#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs the daemon on an embedded example: builds it, makes a 64 MiB ext4 image seeded
# with a welcome file, starts `vhost-device-pmem serve` on it, and boots a guest under
# QEMU (>= 11.1, installed by setup.sh) that mounts /dev/pmem0 with DAX, reads the
# file, writes one back and fsyncs it. With --shell the guest gives you a shell
# instead (exit it with `poweroff -f`). Run as root. Work files: $DEMO_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
shell=0; [ "${1:-}" = --shell ] && shell=1
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root" >&2; exit 1; }
./guest-tests/setup.sh
. "${VDP_GUEST_CACHE:-/var/tmp/vhost-device-pmem-guest}/env.sh"
cargo build --release --locked
bin=$PWD/target/release/vhost-device-pmem

DEMO_DIR=${DEMO_DIR:-/var/tmp/vhost-device-pmem-demo}
rm -rf "$DEMO_DIR"; mkdir -p "$DEMO_DIR/seed"
cat >"$DEMO_DIR/seed/welcome.txt" <<'TXT'
This file lives in a host file served by vhost-device-pmem.
The guest sees it as /dev/pmem0 and maps it with DAX: no page cache in the guest,
and every fsync in the guest becomes one flush request answered by the daemon.
TXT
img=$DEMO_DIR/pmem.img
dd if=/dev/zero of="$img" bs=1M count=64 status=none conv=fsync
mkfs.ext4 -q -F -b 4096 -E nodiscard -d "$DEMO_DIR/seed" "$img"
chmod 600 "$img"
# mkfs leaves unwritten extents: make the block map immutable, then show the verdict.
"$bin" prepare "$img"
"$bin" check "$img" || true

"$bin" serve --socket-path "$DEMO_DIR/vu.sock" --file "$img" \
  --control-socket "$DEMO_DIR/ctl.sock" 2>"$DEMO_DIR/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$DEMO_DIR/ctl.sock" ] && break; sleep 0.1; done
"$bin" status --control-socket "$DEMO_DIR/ctl.sock"

if [ $shell = 1 ]; then
  script='mkdir -p /mnt/p; mount -t ext4 -o dax /dev/pmem0 /mnt/p; echo "/dev/pmem0 is mounted on /mnt/p"; setsid cttyhack sh'
else
  script='mkdir -p /mnt/p
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 1
grep " /mnt/p " /proc/mounts
cat /mnt/p/welcome.txt
date > /mnt/p/from-the-guest.txt && sync /mnt/p/from-the-guest.txt && echo "guest: wrote and fsynced from-the-guest.txt"
umount /mnt/p'
fi
mkdir -p "$DEMO_DIR/initrd.d"
printf '#!/bin/sh\n%s\n' "$script" >"$DEMO_DIR/initrd.d/test.sh"; chmod +x "$DEMO_DIR/initrd.d/test.sh"
(cd "$DEMO_DIR/initrd.d" && echo test.sh | cpio -o -H newc --quiet) >"$DEMO_DIR/extra.cpio"
cat "$VDP_INITRAMFS" "$DEMO_DIR/extra.cpio" >"$DEMO_DIR/initrd"

R=$VDP_QEMU_ROOT
"$R/lib64/ld-linux-x86-64.so.2" --library-path "$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu" \
  "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" \
  -machine "q35,accel=$VDP_ACCEL,memory-backend=mem" \
  -object memory-backend-memfd,id=mem,size=512M,share=on -m 512M -smp 2 \
  -nodefaults -display none -serial stdio -no-reboot \
  -kernel "$VDP_KERNEL" -initrd "$DEMO_DIR/initrd" -append "console=ttyS0 quiet panic=-1" \
  -chardev socket,id=vu0,path="$DEMO_DIR/vu.sock" \
  -device vhost-user-test-device-pci,chardev=vu0,virtio-id=27,num_vqs=1,config_size=16

echo "--- daemon stats after the guest powered off:"
"$bin" stats --control-socket "$DEMO_DIR/ctl.sock"
echo "--- the guest's file, read on the host (debugfs):"
debugfs -R "cat /from-the-guest.txt" "$img" 2>/dev/null || true
kill -TERM $daemon; wait $daemon || true
echo "--- daemon log: $DEMO_DIR/daemon.log"
