#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Host work per guest flush on a DAX host, in one run: a lab VM (L1) plays a host
# with persistent memory (an emulated NVDIMM turned fsdax, ext4 mounted -o dax) and
# boots a guest (L2) of its own with four pmem backends, each on a prepared file of
# L1's DAX filesystem:
#   builtin  QEMU's own virtio-pmem-pci (an fsync of the file per flush request)
#   direct   this daemon, --mode direct (flushes answered without a syscall)
#   fsync    this daemon, --mode fsync (the control: one fsync per batch)
#   nvdimm   an NVDIMM, pmem=on (QEMU maps it MAP_SYNC): the guest flushes cache
#            lines itself, no flush request at all
# In L2, each round runs a loop of 4 KiB writes, each followed by fsync (on the
# NVDIMM: cache-line write-backs and a fence through a MAP_SYNC mapping), on every
# backend in turn, the order rotated each round. L1 counts for each phase: sync
# syscalls of QEMU and of the daemons (strace, QEMU's through a seccomp filter so its
# vCPU threads run untraced), the time spent inside them, ext4 journal commits of
# its DAX filesystem (/proc/fs/jbd2) and the daemons' CPU time. Prints a table per
# backend: guest fsyncs/s (median of the rounds, min-max), the median of the
# per-round ratios to the built-in device, and the host work per guest fsync.
# Nested TCG: the guest-level rates are dominated by emulation (see
# docs/dax-host.md for what carries over to a KVM host with real pmem).
#
# Usage: benches/dax-host.sh [--rounds R] [--ops N] [--quick]
#   --rounds R   rounds (default 3)
#   --ops N      guest operations per backend and round (default 200)
#   --quick      CI smoke run: 1 round, 40 ops (its figures are not measurements)
# Results (the table, summary.md, and the whole run's log): $VDP_BENCH_DIR
# (default /var/tmp/vhost-device-pmem-bench/dax-host). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 ops=200
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --quick) rounds=1; ops=40; shift ;;
    -h|--help) sed -n '3,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;/^set -e/d'; exit 0 ;;
    *) echo "dax-host.sh: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "dax-host.sh: run as root (QEMU, the guest environment)" >&2; exit 1; }
out=${VDP_BENCH_DIR:-/var/tmp/vhost-device-pmem-bench/dax-host}
mkdir -p "$out"
./guest-tests/setup.sh >&2
echo "dax-host.sh: $rounds rounds x $ops ops per backend, one nested boot (several minutes)" >&2
VDP_REQUIRE_GUEST=1 VDP_BENCH_ROUNDS=$rounds VDP_BENCH_OPS=$ops \
  cargo test --locked --test nested_bench -- --ignored --exact bench_dax_host --nocapture \
  >"$out/run.log" 2>&1 || { tail -40 "$out/run.log" >&2; echo "dax-host.sh: the run failed (log: $out/run.log)" >&2; exit 1; }
sed -n '/^DAX host benchmark/,/^VDP-BENCH-RAW/p' "$out/run.log" | grep -v '^VDP-BENCH-RAW' >"$out/summary.md"
grep '^VDP-BENCH-RAW' "$out/run.log" | sed 's/^VDP-BENCH-RAW //' >"$out/raw.json"
cat "$out/summary.md"
echo "dax-host.sh: results in $out (summary.md, raw.json, run.log)" >&2
