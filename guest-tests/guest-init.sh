#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the test guests: mounts the basics, loads the modules listed in
# /etc/modules (virtio-pmem and libnvdimm first), runs /test.sh (appended by each
# test as a second initramfs archive) and powers off. Markers on the console:
#   VDP-READY            modules loaded, /test.sh about to run
#   VDP-RESULT <rc>      /test.sh's exit status
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null || echo "VDP-WARN insmod $m failed"
done </etc/modules
mdev -s 2>/dev/null
echo "VDP-READY"
rc=0
if [ -x /test.sh ]; then
  /test.sh
  rc=$?
fi
echo "VDP-RESULT $rc"
sync
poweroff -f
