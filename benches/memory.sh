#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The daemon's memory: resident set (VmRSS, VmHWM from /proc/PID/status) while it
# serves a 256 MiB, a 4 GiB and a 64 GiB region, with a guest connected and through
# 100k flushes.
#
# For each size: makes a sparse loop image under $VDP_BENCH_DIR, XFS on it, and on
# that a fully written ext4 region file (immutable block map, so datasync mode
# qualifies); starts `serve`; boots a guest (3 GiB RAM: a 64 GiB DAX region needs
# 1 GiB of struct pages) that mounts the region with DAX, does 20 write+fsync
# operations, then --flushes bare fsyncs of a clean file (flushbench --no-write: each
# one is exactly one flush request, the cheapest way for a TCG guest to send many).
# The host samples the daemon's RSS after start, after the 20 fsyncs, every half
# second during the loop, and after it. VmHWM is only updated by the kernel when
# memory is unmapped, so the peak reported is the largest of every VmHWM and VmRSS
# sampled. Everything made is
# removed at the end. A size that does not fit in the free space of /var/tmp is
# skipped, loudly.
#
# Usage: benches/memory.sh [--sizes "256M 4G 64G"] [--flushes N] [--mode MODE]
#   --sizes    region sizes (M or G suffix; default "256M 4G 64G")
#   --flushes  flush requests to drive (default 100000)
#   --mode     daemon mode: datasync (default), fsync or volatile
# Results: $VDP_BENCH_DIR/memory (default /var/tmp/vhost-device-pmem-bench/memory):
# results.tsv, summary.md, per size the RSS samples, console and daemon log. Root.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=memory
# shellcheck source=benches/lib.sh
. benches/lib.sh

sizes="256M 4G 64G" flushes=100000 mode=datasync
while [ $# -gt 0 ]; do
  case $1 in
    --sizes) sizes=$2; shift 2 ;;
    --flushes) flushes=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    -h|--help) sed -n '3,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;/^set -e/d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case $mode in datasync|fsync|volatile) ;; *) die "--mode must be datasync, fsync or volatile" ;; esac

WORK=${VDP_BENCH_DIR:-/var/tmp/vhost-device-pmem-bench}/memory
BOOT_TIMEOUT=${VDP_BENCH_BOOT_TIMEOUT:-1800}
rm -rf "$WORK"; mkdir -p "$WORK/seed/bench"
DAEMON_PID= QEMU_PID= LOOPDEV= MNT= LOOPIMG=
cleanup() {
  [ -n "${QEMU_PID:-}" ] && kill -KILL "$QEMU_PID" 2>/dev/null || true
  [ -n "${DAEMON_PID:-}" ] && kill -KILL "$DAEMON_PID" 2>/dev/null || true
  QEMU_PID= DAEMON_PID=
  if [ -n "${MNT:-}" ]; then umount "$MNT" 2>/dev/null || true; rmdir "$MNT" 2>/dev/null || true; MNT=; fi
  if [ -n "${LOOPDEV:-}" ]; then losetup -d "$LOOPDEV" 2>/dev/null || true; LOOPDEV=; fi
  if [ -n "${LOOPIMG:-}" ]; then rm -f "$LOOPIMG"; LOOPIMG=; fi
}
trap cleanup EXIT
trap "exit 143" INT TERM
command -v mkfs.xfs >/dev/null || [ -x /usr/sbin/mkfs.xfs ] || {
  apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xfsprogs >&2; }

bench_init
qemu_cmd

for i in 0 1 2 3; do head -c 4M /dev/urandom >"$WORK/seed/bench/f$i"; done
script="mkdir -p /mnt/p
i=0; while [ ! -b /dev/pmem0 ] && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i + 1)); done
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 1
grep ' /mnt/p ' /proc/mounts | grep -q dax || { echo 'VDP-BENCH-ERROR /mnt/p is not mounted with DAX'; exit 1; }
/flushbench --mode fsync --threads 1 --ops 20 --warmup 0 --dir /mnt/p/bench --require-dax || exit 1
echo VDP-PHASE-DONE warm; sleep 2
/flushbench --mode fsync --no-write --threads 1 --ops $flushes --warmup 0 --dir /mnt/p/bench --require-dax || exit 1
echo VDP-PHASE-DONE flushes; sleep 2
umount /mnt/p || exit 1"
make_initrd "$WORK" "$script"
common=(-machine "q35,accel=$VDP_ACCEL,memory-backend=mem"
        -object "memory-backend-memfd,id=mem,size=3G,share=on" -m 3G -smp 2
        -nodefaults -display none -serial stdio -no-reboot
        -kernel "$VDP_KERNEL" -initrd "$WORK/initrd" -append "console=ttyS0 quiet panic=-1 loglevel=4")
[ "$VDP_ACCEL" = kvm ] && common+=(-cpu host)

# rss PID: "VmRSS VmHWM RssAnon RssFile RssShmem" in KiB.
rss() {
  awk '/^VmRSS/{a=$2} /^VmHWM/{b=$2} /^RssAnon/{c=$2} /^RssFile/{d=$2} /^RssShmem/{e=$2}
       END {print a+0, b+0, c+0, d+0, e+0}' "/proc/$1/status"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

printf 'size\tstatus\trss_start\thwm_start\trss_warm\thwm_warm\trss_loop_min\trss_loop_max\trss_after\tpeak\tanon_after\tfile_after\tshmem_after\tflushes\tsyncs\tops_per_sec\tsecs_prepare\n' >"$WORK/results.tsv"
failures=0

for size in $sizes; do
  case $size in
    *G) smib=$(( ${size%G} * 1024 )) ;;
    *M) smib=${size%M} ;;
    *) die "bad size $size (use M or G)" ;;
  esac
  d=$WORK/$size; mkdir -p "$d"
  # The XFS gets the region plus 1/64 + 512 MiB for its own metadata and log; the
  # host must hold all of that (the loop image is sparse, the region is not) plus
  # 512 MiB left for everyone else.
  fsmib=$(( smib + smib / 64 + 512 ))
  need=$(( fsmib + 512 ))
  avail=$(df -B1M --output=avail "$WORK" | tail -n1 | tr -d ' ')
  if [ "$avail" -lt "$need" ]; then
    log "*** SKIPPING $size: it needs ~$need MiB on $(df --output=target "$WORK" | tail -n1) and only $avail MiB are free ***"
    printf '%s\tSKIPPED (%s MiB free, %s needed)\n' "$size" "$avail" "$need" >>"$WORK/results.tsv"
    continue
  fi
  t0=$(date +%s)
  LOOPIMG=$WORK/xfs-$size.img
  truncate -s "${fsmib}M" "$LOOPIMG"
  LOOPDEV=$(losetup --direct-io=on -f --show "$LOOPIMG")
  mkfs.xfs -q -f "$LOOPDEV"
  MNT=$WORK/mnt-$size; mkdir -p "$MNT"
  mount "$LOOPDEV" "$MNT"
  region=$MNT/pmem.img
  log "$size: writing a fully written ext4 region on XFS ($LOOPDEV)"
  make_ext4_image "$region" "$smib" "$WORK/seed"
  tprep=$(( $(date +%s) - t0 ))
  log "$size: region ready in ${tprep}s; $(filefrag "$region" | sed 's/.*: //')"

  start_daemon "$d" "$region" "$mode"
  sleep 0.5
  read -r rss_start hwm_start _ <<<"$(rss "$DAEMON_PID")"
  : >"$d/samples.tsv"
  "${QEMU[@]}" "${common[@]}" -chardev "socket,id=vu0,path=$d/vu.sock" \
    -device vhost-user-test-device-pci,chardev=vu0,virtio-id=27,num_vqs=1,config_size=16 \
    </dev/null >"$d/console.log" 2>&1 &
  QEMU_PID=$!
  deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
  rss_warm= hwm_warm= rss_after= hwm_after= anon= file= shmem= req=0 tick=0 peak=$hwm_start
  while kill -0 "$QEMU_PID" 2>/dev/null; do
    read -r r h _ <<<"$(rss "$DAEMON_PID")"
    [ "$r" -gt "$peak" ] && peak=$r
    [ "$h" -gt "$peak" ] && peak=$h
    if [ -z "$rss_warm" ] && grep -aq 'VDP-PHASE-DONE warm' "$d/console.log"; then
      read -r rss_warm hwm_warm _ <<<"$(rss "$DAEMON_PID")"
    fi
    if [ -n "$rss_warm" ] && [ -z "$rss_after" ]; then
      # The flush count every 2 s (each control request is a short-lived thread in
      # the daemon; polling it more often would measure the polling), RSS every 0.5 s.
      if [ $((tick % 4)) = 0 ]; then
        "$DAEMON_BIN" stats --control-socket "$d/ctl.sock" >"$d/stats.json" 2>/dev/null || true
        req=$(stats_field "$d/stats.json" flush_requests)
      fi
      tick=$((tick + 1))
      printf '%s\t%s\t%s\n' "$(date +%s.%N)" "${req:-0}" "$(rss "$DAEMON_PID")" >>"$d/samples.tsv"
    fi
    if [ -z "$rss_after" ] && grep -aq 'VDP-PHASE-DONE flushes' "$d/console.log"; then
      read -r rss_after hwm_after anon file shmem <<<"$(rss "$DAEMON_PID")"
      "$DAEMON_BIN" stats --control-socket "$d/ctl.sock" >"$d/stats-after.json"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "$size: no power-off within ${BOOT_TIMEOUT}s; killing QEMU"
      kill -KILL "$QEMU_PID" 2>/dev/null || true
    fi
    sleep 0.5
  done
  rc=0; wait "$QEMU_PID" || rc=$?
  QEMU_PID=
  read -r r hwm_end _ <<<"$(rss "$DAEMON_PID")"
  for v in "$r" "$hwm_end" "${rss_after:-0}" "${hwm_after:-0}" "${rss_warm:-0}" "${hwm_warm:-0}"; do
    [ "$v" -gt "$peak" ] && peak=$v
  done
  stop_daemon || rc=1
  tr -d '\r' <"$d/console.log" >"$d/console.txt"
  result=$(sed -n 's/.*VDP-RESULT \([0-9]*\).*/\1/p' "$d/console.txt" | tail -n1)
  line=$(grep '^VDP-BENCH mode=flush' "$d/console.txt" || true)
  if [ "$rc" != 0 ] || [ "${result:-x}" != 0 ] || [ -z "$line" ] || [ -z "$rss_after" ]; then
    log "$size: FAILED (qemu rc $rc, guest result ${result:-none}); console: $d/console.txt"
    tail -n 30 "$d/console.txt" >&2
    printf '%s\tFAILED\n' "$size" >>"$WORK/results.tsv"
    failures=$((failures + 1))
  else
    # RSS over the loop, from the first sample with 10% of the flushes done (the ring
    # and the pages it touches are resident by then) to the end.
    read -r lmin lmax <<<"$(awk -v n="$flushes" '$2 >= n / 10 { if (!s || $3 < lo) lo = $3; if ($3 > hi) hi = $3; s = 1 }
                                                   END { if (s) print lo, hi; else print "NA NA" }' "$d/samples.tsv")"
    printf '%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" \
      "$rss_start" "$hwm_start" "$rss_warm" "$hwm_warm" "$lmin" "$lmax" "$rss_after" "$peak" \
      "$anon" "$file" "$shmem" "$(stats_field "$d/stats-after.json" flush_requests)" \
      "$(stats_field "$d/stats-after.json" syncs)" \
      "$(sed 's/.* ops_per_sec=\([0-9.]*\).*/\1/' <<<"$line")" "$tprep" >>"$WORK/results.tsv"
    log "$size: RSS start $(mib "$rss_start") MiB, after mount+fsyncs $(mib "$rss_warm") MiB, after $(stats_field "$d/stats-after.json" flush_requests) flushes $(mib "$rss_after") MiB, peak $(mib "$peak") MiB"
  fi
  cleanup
done

{
  echo "## Daemon memory (mode $mode, guest with 3 GiB RAM, $flushes bare guest fsyncs, one flush request each)"
  echo
  echo "| region | RSS after start | RSS after mount + 20 fsyncs | RSS during the flush loop (min–max, after 10%) | RSS after the flushes | peak over the run (max of VmHWM, VmRSS samples) | after: anon / file / shmem | flush requests answered | host syncs | guest ops/s |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  awk -F'\t' 'function m(k) { return sprintf("%.1f MiB", k / 1024) }
    NR == 1 { next }
    $2 != "ok" { printf "| %s | %s | | | | | | | | |\n", $1, $2; next }
    { loop = ($7 == "NA") ? "– (loop too short to sample)" : sprintf("%.1f–%.1f MiB", $7/1024, $8/1024)
      printf "| %s | %s | %s | %s | %s | %s | %.1f / %.1f / %.1f MiB | %s | %s | %.0f |\n", $1, m($3), m($5), loop, m($9), m($10), $11/1024, $12/1024, $13/1024, $14, $15, $16 }' "$WORK/results.tsv"
  echo
  awk -F'\t' 'NR > 1 && $2 == "ok" { if ($10 > max) max = $10; n++ }
    END { if (n) printf "Goal: < 16 MiB whatever the region size: peak %.1f MiB: %s\n", max / 1024, (max < 16 * 1024 ? "met" : "MISSED") }' "$WORK/results.tsv"
} | tee "$WORK/summary.md"
log "results: $WORK/results.tsv, summary: $WORK/summary.md"
[ "$failures" = 0 ] || { log "$failures size(s) FAILED"; exit 1; }
