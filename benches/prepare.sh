#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# prepare throughput vs dd, and check time on a heavily fragmented file, on freshly
# made ext4 and XFS loop mounts (sparse images in /var/tmp, removed at exit).
#
#   sudo benches/prepare.sh            # SIZE_MIB=4096 RUNS=3 by default
#   SIZE_MIB=1024 RUNS=3 benches/prepare.sh
#
# For each filesystem, in the same run: `prepare FILE --size 4G` on a new file and
# `dd if=/dev/zero bs=1M count=4096 conv=fsync` to another, page cache dropped
# before each, after one unmeasured warm-up write, alternating which goes first,
# best of RUNS; ratio = prepare MiB/s / dd MiB/s (goal >= 0.8). Then a
# file with every other 4 KiB block written, prepared (so >= 10,000 extents), and
# the wall time of `check` on it (best of 3).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-4096}
RUNS=${RUNS:-3}
FRAG_MIB=${FRAG_MIB:-80}
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/vhost-device-pmem}

if [ "$(id -u)" != 0 ]; then
    echo "benches/prepare.sh needs root (losetup, mkfs, mount)" >&2
    exit 2
fi
[ -x "$BIN" ] || cargo build --release --quiet
for t in losetup mkfs.ext4 mkfs.xfs mount umount python3; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 2; }
done

WORK=$(mktemp -d /var/tmp/vdp-bench.XXXXXX)
LOOPS=()
MOUNTS=()
cleanup() {
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

mkfs_mount() { # fs; sets MNT (no subshell: the cleanup arrays must see it)
    local fs=$1 img=$WORK/$1.img mnt=$WORK/$1
    truncate -s $((SIZE_MIB * 2 + 2048))M "$img"
    local dev
    dev=$(losetup -f --show --direct-io=on "$img")
    LOOPS+=("$dev")
    case $fs in
    ext4) mkfs.ext4 -q -F "$dev" ;;
    xfs) mkfs.xfs -q -f -m reflink=1 "$dev" ;;
    esac
    mkdir -p "$mnt"
    mount "$dev" "$mnt"
    MOUNTS+=("$mnt")
    MNT=$mnt
}

# A FRAG_MIB file of >= 10,000 extents after prepare (one per 4 KiB block).
# ext4: write every other block, fsyncing in batches; prepare fills the holes with
# blocks from elsewhere. XFS: its speculative preallocation would fill those gaps
# contiguously, so allocate the blocks one at a time alternating with a spacer file.
# (Interleaving does not work on ext4, whose per-inode preallocation keeps each
# file contiguous.)
fragment() {
    python3 - "$1" "$1.spacer" "$FRAG_MIB" "$2" <<'EOF'
import os, sys
path, spacer, mib, fs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
a = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
if fs == "xfs":
    b = os.open(spacer, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    for off in range(0, mib << 20, 4096):
        os.posix_fallocate(a, off, 4096)
        os.posix_fallocate(b, off, 4096)
    os.close(b)
    os.unlink(spacer)
else:
    block = b"\x5a" * 4096
    for off in range(0, mib << 20, 8192):
        os.pwrite(a, block, off)
        if off % (8 << 20) == 0:
            os.fsync(a)
    os.ftruncate(a, mib << 20)
os.fsync(a)
os.close(a)
EOF
}

ROWS=()
for fs in ext4 xfs; do
    mkfs_mount $fs
    mnt=$MNT
    # Warm-up, not measured: the image is sparse, so the first pass over the
    # filesystem's blocks also allocates the image file on the host.
    dd if=/dev/zero of="$mnt/warm.img" bs=1M count="$SIZE_MIB" conv=fsync status=none
    rm -f "$mnt/warm.img"
    best_dd=0 best_prep=0
    run_dd() {
        rm -f "$mnt/dd.img"
        drop_caches
        local t0 t1
        t0=$(now)
        dd if=/dev/zero of="$mnt/dd.img" bs=1M count="$SIZE_MIB" conv=fsync status=none
        t1=$(now)
        rm -f "$mnt/dd.img"
        best_dd=$(echo "d = $SIZE_MIB / ($t1 - $t0); if (d > $best_dd) d else $best_dd" | bc -l)
    }
    run_prepare() {
        rm -f "$mnt/prep.img"
        drop_caches
        local t0 t1
        t0=$(now)
        "$BIN" prepare "$mnt/prep.img" --size "${SIZE_MIB}M" >/dev/null 2>"$WORK/prepare.log" || {
            cat "$WORK/prepare.log" >&2
            exit 1
        }
        t1=$(now)
        best_prep=$(echo "p = $SIZE_MIB / ($t1 - $t0); if (p > $best_prep) p else $best_prep" | bc -l)
    }
    for i in $(seq "$RUNS"); do
        # Alternate who goes first.
        if [ $((i % 2)) = 1 ]; then run_dd; run_prepare; else run_prepare; run_dd; fi
    done
    "$BIN" check "$mnt/prep.img" >/dev/null
    rm -f "$mnt/prep.img"

    fragment "$mnt/frag.img" $fs
    "$BIN" prepare "$mnt/frag.img" >/dev/null 2>&1
    extents=$("$BIN" check --json "$mnt/frag.img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["extents"])')
    drop_caches
    best_check=999999
    for _ in 1 2 3; do
        t0=$(now)
        "$BIN" check "$mnt/frag.img" >/dev/null
        t1=$(now)
        c=$(echo "($t1 - $t0) * 1000" | bc -l)
        best_check=$(echo "if ($c < $best_check) $c else $best_check" | bc -l)
    done
    ratio=$(echo "$best_prep / $best_dd" | bc -l)
    ROWS+=("$(printf '%-5s %10.0f %13.0f %7.2f %10d %12.1f' $fs "$best_dd" "$best_prep" "$ratio" "$extents" "$best_check")")
done

echo
echo "prepare vs dd for ${SIZE_MIB} MiB (best of $RUNS), check on a fragmented ${FRAG_MIB} MiB file"
echo "kernel $(uname -r), $(nproc) cores, loop devices (direct I/O) over sparse images in /var/tmp"
printf '%-5s %10s %13s %7s %10s %12s\n' fs "dd MiB/s" "prepare MiB/s" ratio extents "check ms"
for r in "${ROWS[@]}"; do echo "$r"; done
