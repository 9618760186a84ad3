#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the guests' base initramfs: a static busybox, the kernel modules a virtio-pmem
# (and NVDIMM) guest needs with their dependencies (decompressed so busybox insmod
# loads them), and an /init that mounts the basics, loads the modules and runs
# /test.sh, which each test appends as a second cpio archive.
# Usage: mkinitramfs.sh KERNEL_ROOT KVER OUT.cpio
set -euo pipefail
kroot=$1 kver=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
mods=$kroot/lib/modules/$kver
[ -e "$mods/modules.dep" ] || depmod -b "$kroot" "$kver"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work"/{bin,sbin,proc,sys,dev,mnt,tmp,lib/modules,etc}
cp "$(command -v busybox)" "$work/bin/busybox"
for applet in $("$work/bin/busybox" --list | grep -vx busybox); do
  ln -sf busybox "$work/bin/$applet"
done

# Wanted modules, in load order after dependency resolution from modules.dep.
# virtio_blk and device-mapper: the VMs that play a host (power cut, failing disk).
wanted="libnvdimm nd_btt nd_pmem nd_virtio virtio_pmem nfit xfs virtio_blk ext4 dm_mod dm_flakey dm_log_writes"
declare -A seen=()
order=()
resolve() {
  local name=$1 line path dep
  line=$(grep -E "(^|/)${name//_/[_-]}\.ko(\.[a-z]+)?:" "$mods/modules.dep" || true)
  [ -n "$line" ] || { grep -qE "/${name//_/[_-]}\.ko" "$mods/modules.builtin" 2>/dev/null || echo "mkinitramfs: no module $name" >&2; return 0; }
  path=${line%%:*}
  [ -n "${seen[$path]:-}" ] && return 0
  seen[$path]=1
  for dep in ${line#*:}; do
    dep=$(basename "$dep"); dep=${dep%%.ko*}
    resolve "$dep"
  done
  order+=("$path")
}
for m in $wanted; do resolve "$m"; done

: >"$work/etc/modules"
for path in "${order[@]}"; do
  base=$(basename "$path")
  case "$base" in
    *.ko.xz) xz -dc "$mods/$path" >"$work/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$mods/$path" >"$work/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *.ko.gz) gzip -dc "$mods/$path" >"$work/lib/modules/${base%.gz}"; base=${base%.gz} ;;
    *) cp "$mods/$path" "$work/lib/modules/$base" ;;
  esac
  echo "$base" >>"$work/etc/modules"
done

install -m 0755 "$here/guest-init.sh" "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet) >"$out.tmp"
mv "$out.tmp" "$out"
echo "mkinitramfs: $out ($(wc -l <"$work/etc/modules") modules)" >&2
