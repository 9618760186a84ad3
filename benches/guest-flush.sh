#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Flush speed of this daemon against QEMU's own virtio-pmem, in one run.
#
# Prepares one fully written 256 MiB ext4 image (4 KiB blocks, immutable block map,
# bench files f0..f3 preallocated and written by mkfs -d so the guest never allocates),
# then for R rounds boots the same kernel under the same QEMU once per backend, in
# alternating order (reversed every other round), each boot on a fresh copy of the
# image:
#   builtin   QEMU's virtio-pmem-pci on a memory-backend-file (an fsync per flush,
#             on QEMU's thread pool)
#   datasync  this daemon, --mode datasync (one fdatasync per batch of flushes)
#   fsync     this daemon, --mode fsync (one fsync per batch)
#   volatile  this daemon, --mode volatile (no syscall at all)
#   ceiling   QEMU's virtio-pmem-pci on a copy in tmpfs (/dev/shm), where fsync(2)
#             returns at once: what the guest path costs when a flush costs nothing
#             on the host (the reference for volatile)
# Each boot mounts /dev/pmem0 with DAX and runs benches/guest/flushbench: the fsync
# loop (1 thread), the msync loop (1 thread), the fsync loop from 4 threads and the
# msync loop from 4 threads (each thread on its own file), on -smp 2. (ext4's journal
# serializes the 4 fsync writers' flushes inside the guest; 4 msync writers, which
# rarely need a journal commit, put concurrent flushes on the device's queue.) Prints a table per workload x backend (median ops/s, min-max, ratio to the
# built-in device's median from the same run, the per-round paired ratios), the
# daemon's flush counters per workload (requests per guest op, host syncs per
# request: group commit), the host CPU used by other processes during each boot
# (noise), and the goals. Exits non-zero if any boot or check fails; a missed goal is
# reported, not an error.
#
# Usage: benches/guest-flush.sh [--rounds R] [--ops N] [--quick] [--backends "LIST"]
#   --rounds R   rounds (default 5)
#   --ops N      timed operations per workload and boot (default 2000; the 4-thread
#                workload splits them between its threads)
#   --quick      CI smoke run: 1 round, 200 ops, no waiting for a quiet host (its
#                figures are not measurements)
# Environment: VDP_BENCH_IDLE_WAIT (s, default 30): before each boot, wait up to this
# long for the host to be nearly idle; VDP_BENCH_NICE (e.g. -10): run QEMU and the
# daemon under nice; VDP_BENCH_BOOT_TIMEOUT (s, default 600).
# Work files and results (results.tsv, summary.md, every console and daemon log):
#   $VDP_BENCH_DIR (default /var/tmp/vhost-device-pmem-bench/flush). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=guest-flush
# shellcheck source=benches/lib.sh
. benches/lib.sh

rounds=5 ops=2000 quick=0
# Before each boot, wait up to this long (s) for other work on the host to stop.
IDLE_WAIT=${VDP_BENCH_IDLE_WAIT:-30}
backends="builtin datasync fsync volatile ceiling"
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --quick) quick=1; rounds=1; ops=200; IDLE_WAIT=${VDP_BENCH_IDLE_WAIT:-0}; shift ;;
    --backends) backends=$2; shift 2 ;;
    -h|--help) sed -n '3,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;/^set -e/d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ "$rounds" -ge 1 ] && [ "$ops" -ge 4 ] || die "bad --rounds/--ops"

WORK=${VDP_BENCH_DIR:-/var/tmp/vhost-device-pmem-bench}/flush
SHM_IMG=/dev/shm/vhost-device-pmem-bench-ceiling.img
IMG_MIB=256
BOOT_TIMEOUT=${VDP_BENCH_BOOT_TIMEOUT:-600}
rm -rf "$WORK"; mkdir -p "$WORK/seed/bench"
DAEMON_PID= QEMU_PID=
cleanup() {
  [ -n "${QEMU_PID:-}" ] && kill -KILL "$QEMU_PID" 2>/dev/null || true
  [ -n "${DAEMON_PID:-}" ] && kill -KILL "$DAEMON_PID" 2>/dev/null || true
  rm -f "$SHM_IMG"
}
trap cleanup EXIT
trap "exit 143" INT TERM

bench_init
qemu_cmd

# 1. The prepared image: four 16 MiB bench files of random bytes (mke2fs -d leaves
# all-zero blocks unallocated, so zeros would give the guest holes to allocate).
for i in 0 1 2 3; do head -c 16M /dev/urandom >"$WORK/seed/bench/f$i"; done
make_ext4_image "$WORK/prepared.img" "$IMG_MIB" "$WORK/seed"
for i in 0 1 2 3; do
  # Every bench file fully allocated and initialized inside the image.
  ex=$(debugfs -R "ex /bench/f$i" "$WORK/prepared.img" 2>/dev/null)
  printf '%s\n' "$ex" | grep -qi uninit && die "bench file f$i has uninitialized extents"
  used=$(debugfs -R "stat /bench/f$i" "$WORK/prepared.img" 2>/dev/null | sed -n 's/.*Blockcount: \([0-9]*\).*/\1/p')
  [ "${used:-0}" -ge $((16 * 2048)) ] || die "bench file f$i is not fully allocated (blockcount ${used:-?})"
done
log "prepared $WORK/prepared.img ($IMG_MIB MiB, block map fully written, bench files allocated)"

# 2. The guest side: mount with DAX, run the three workloads, mark each end so the
# host can snapshot the daemon's counters (the guest waits a second for it).
script="mkdir -p /mnt/p
i=0; while [ ! -b /dev/pmem0 ] && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i + 1)); done
mount -t ext4 -o dax /dev/pmem0 /mnt/p || exit 1
grep ' /mnt/p ' /proc/mounts | grep -q dax || { echo 'VDP-BENCH-ERROR /mnt/p is not mounted with DAX'; exit 1; }
echo \"VDP-IRQ \$(grep -E 'virtio' /proc/interrupts | tr -s ' ' | tr '\n' ';')\"
phase() { echo \"VDP-PHASE-DONE \$1\"; sleep 1; }
phase mount
/flushbench --mode fsync --threads 1 --ops $ops --dir /mnt/p/bench --require-dax || exit 1
phase fsync-1
/flushbench --mode msync --threads 1 --ops $ops --dir /mnt/p/bench --require-dax || exit 1
phase msync-1
/flushbench --mode fsync --threads 4 --ops $ops --dir /mnt/p/bench --require-dax || exit 1
phase fsync-4
/flushbench --mode msync --threads 4 --ops $ops --dir /mnt/p/bench --require-dax || exit 1
phase msync-4
umount /mnt/p || exit 1"
make_initrd "$WORK" "$script"

common=(-machine "q35,accel=$VDP_ACCEL,memory-backend=mem"
        -object "memory-backend-memfd,id=mem,size=512M,share=on" -m 512M,slots=2,maxmem=2G -smp 2
        -nodefaults -display none -serial stdio -no-reboot
        -kernel "$VDP_KERNEL" -initrd "$WORK/initrd" -append "console=ttyS0 quiet panic=-1 loglevel=4")
[ "$VDP_ACCEL" = kvm ] && common+=(-cpu host)

printf 'round\tpos\tbackend\tworkload\tops\tsecs\tops_per_sec\twarmup\trequests\tbatches\tsyncs\tother_cpu\tload_before\n' >"$WORK/results.tsv"
failures=0

# boot ROUND POS BACKEND: one boot, its lines appended to results.tsv.
boot() {
  local round=$1 pos=$2 backend=$3 dir img dev=()
  dir=$WORK/r$round-$backend
  mkdir -p "$dir"
  case $backend in
    ceiling) img=$SHM_IMG ;;
    *) img=$dir/pmem.img ;;
  esac
  copy_image "$WORK/prepared.img" "$img"
  case $backend in
    builtin|ceiling)
      dev=(-object "memory-backend-file,id=pm0,share=on,mem-path=$img,size=${IMG_MIB}M"
           -device virtio-pmem-pci,memdev=pm0,id=vpm0) ;;
    datasync|fsync|volatile)
      start_daemon "$dir" "$img" "$backend"
      dev=(-chardev "socket,id=vu0,path=$dir/vu.sock"
           -device vhost-user-test-device-pci,chardev=vu0,virtio-id=27,num_vqs=1,config_size=16) ;;
    *) die "unknown backend $backend" ;;
  esac

  local busy0 t0 qticks=0 handled=0 deadline rc=0 phases p pre
  pre=$(wait_for_quiet "$IDLE_WAIT")
  busy0=$(host_busy_ticks); t0=$(date +%s.%N)
  deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
  "${BENCH_NICE[@]}" "${QEMU[@]}" "${common[@]}" "${dev[@]}" </dev/null >"$dir/console.log" 2>&1 &
  QEMU_PID=$!
  while kill -0 "$QEMU_PID" 2>/dev/null; do
    qticks=$(proc_ticks "$QEMU_PID")
    mapfile -t phases < <(grep -a -o 'VDP-PHASE-DONE [a-z0-9-]*' "$dir/console.log" || true)
    while [ "$handled" -lt "${#phases[@]}" ]; do
      p=${phases[$handled]#VDP-PHASE-DONE }
      if [ -n "${DAEMON_PID:-}" ]; then
        "$DAEMON_BIN" stats --control-socket "$dir/ctl.sock" >"$dir/stats-$p.json" || true
      fi
      handled=$((handled + 1))
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "round $round $backend: no power-off within ${BOOT_TIMEOUT}s; killing QEMU"
      kill -KILL "$QEMU_PID" 2>/dev/null || true
    fi
    sleep 0.1
  done
  wait "$QEMU_PID" || rc=$?
  QEMU_PID=
  local dticks=0 busy1 t1 other
  [ -n "${DAEMON_PID:-}" ] && dticks=$(proc_ticks "$DAEMON_PID")
  busy1=$(host_busy_ticks); t1=$(date +%s.%N)
  other=$(awk -v b="$((busy1 - busy0 - qticks - dticks))" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" \
          'BEGIN { v = b / hz / (t1 - t0); if (v < 0) v = 0; printf "%.2f", v }')
  if [ -n "${DAEMON_PID:-}" ]; then
    "$DAEMON_BIN" stats --control-socket "$dir/ctl.sock" >"$dir/stats-final.json" || true
    stop_daemon || rc=1
  fi
  [ "$backend" = ceiling ] && rm -f "$SHM_IMG"
  [ "$backend" != ceiling ] && rm -f "$img"

  tr -d '\r' <"$dir/console.log" >"$dir/console.txt"
  local result
  result=$(sed -n 's/.*VDP-RESULT \([0-9]*\).*/\1/p' "$dir/console.txt" | tail -n1)
  if [ "$rc" != 0 ] || [ "${result:-x}" != 0 ] || [ "$(grep -c '^VDP-BENCH mode' "$dir/console.txt")" != 4 ]; then
    log "round $round $backend: boot FAILED (qemu rc $rc, guest result ${result:-none}); console: $dir/console.txt"
    tail -n 30 "$dir/console.txt" >&2
    failures=$((failures + 1))
    return 0
  fi
  # One results line per workload, with the daemon's counters over that workload.
  local prev=mount line w req bat syn
  while read -r line; do
    w=$(printf '%s\n' "$line" | sed 's/.*mode=\([a-z]*\) threads=\([0-9]*\).*/\1-\2/')
    req=NA bat=NA syn=NA
    if [ -f "$dir/stats-$prev.json" ] && [ -f "$dir/stats-$w.json" ]; then
      req=$(( $(stats_field "$dir/stats-$w.json" flush_requests) - $(stats_field "$dir/stats-$prev.json" flush_requests) ))
      bat=$(( $(stats_field "$dir/stats-$w.json" batches) - $(stats_field "$dir/stats-$prev.json" batches) ))
      syn=$(( $(stats_field "$dir/stats-$w.json" syncs) - $(stats_field "$dir/stats-$prev.json" syncs) ))
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$pos" "$backend" "$w" \
      "$(sed 's/.* ops=\([0-9]*\).*/\1/' <<<"$line")" "$(sed 's/.* secs=\([0-9.]*\).*/\1/' <<<"$line")" \
      "$(sed 's/.* ops_per_sec=\([0-9.]*\).*/\1/' <<<"$line")" "$(sed 's/.* warmup=\([0-9]*\).*/\1/' <<<"$line")" \
      "$req" "$bat" "$syn" "$other" "$pre" >>"$WORK/results.tsv"
    prev=$w
  done < <(grep '^VDP-BENCH mode' "$dir/console.txt")
  log "round $round: $backend done ($(grep '^VDP-BENCH mode' "$dir/console.txt" | sed 's/.*mode=\([a-z]*\) threads=\([0-9]*\).*ops_per_sec=\([0-9.]*\).*/\1-\2 \3/' | tr '\n' ' ')ops/s; other host CPU ${other} cores)"
}

read -r -a order <<<"$backends"
start=$(date +%s)
for round in $(seq "$rounds"); do
  if [ $((round % 2)) = 0 ]; then
    seq_=(); for ((i = ${#order[@]} - 1; i >= 0; i--)); do seq_+=("${order[$i]}"); done
  else
    seq_=("${order[@]}")
  fi
  log "round $round/$rounds: ${seq_[*]}"
  pos=0
  for b in "${seq_[@]}"; do pos=$((pos + 1)); boot "$round" "$pos" "$b"; done
done
elapsed=$(( $(date +%s) - start ))

# 3. The tables.
{
  echo "## Guest flush rate: this daemon vs QEMU's built-in virtio-pmem"
  echo
  echo "$rounds round(s) x ${#order[@]} backends, $ops timed ops per workload and boot, accel=$VDP_ACCEL, $(nproc) host CPUs; $elapsed s of boots."
  [ -n "${VDP_BENCH_NICE:-}" ] && echo "QEMU and the daemon ran under nice -n $VDP_BENCH_NICE."
  [ $quick = 1 ] && echo "QUICK MODE (smoke test): too few operations for these figures to mean anything."
  echo
  awk -F'\t' -v backends="$backends" '
    function median(s,   n, a, i, j, t) {
      n = split(s, a, " ")
      for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j+1] = a[j]; a[j+1] = t }
      return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
    }
    function minmax(s,   n, a, i, lo, hi) {
      n = split(s, a, " "); lo = hi = a[1] + 0
      for (i = 2; i <= n; i++) { if (a[i] + 0 < lo) lo = a[i] + 0; if (a[i] + 0 > hi) hi = a[i] + 0 }
      return sprintf("%.0f–%.0f", lo, hi)
    }
    function rminmax(s,   n, a, i, lo, hi) {
      n = split(s, a, " "); if (n == 0) return "–"; lo = hi = a[1] + 0
      for (i = 2; i <= n; i++) { if (a[i] + 0 < lo) lo = a[i] + 0; if (a[i] + 0 > hi) hi = a[i] + 0 }
      return sprintf("%.2f–%.2f", lo, hi)
    }
    NR == 1 { next }
    {
      k = $4 SUBSEP $3
      v[k] = v[k] " " $7; cnt[k]++
      per[$1 SUBSEP $4 SUBSEP $3] = $7
      if ($9 != "NA") { req[k] += $9; bat[k] += $10; syn[k] += $11; gops[k] += $5 + $8 }
      other = other " " $12; if ($12 + 0 > omax) omax = $12 + 0
      if ($1 > rounds) rounds = $1
    }
    END {
      nb = split(backends, B, " ")
      nw = split("fsync-1 msync-1 fsync-4 msync-4", W, " ")
      title["fsync-1"] = "fsync loop, 1 thread"
      title["msync-1"] = "msync loop, 1 thread"
      title["fsync-4"] = "fsync loop, 4 threads"
      title["msync-4"] = "msync loop, 4 threads"
      print "| workload | backend | runs | median ops/s | min–max | vs built-in (median/median) | per-round ratio min–max | flush requests per guest op | requests per batch | host syncs per request |"
      print "|---|---|---|---|---|---|---|---|---|---|"
      for (i = 1; i <= nw; i++) {
        w = W[i]; base = ""
        if ((w SUBSEP "builtin") in v) base = median(v[w SUBSEP "builtin"])
        for (j = 1; j <= nb; j++) {
          b = B[j]; k = w SUBSEP b
          if (!(k in v)) continue
          m = median(v[k]); med[k] = m
          ratio = (base != "" && base > 0) ? sprintf("%.2fx", m / base) : "–"
          rr = ""
          for (r = 1; r <= rounds; r++)
            if ((r SUBSEP w SUBSEP b) in per && (r SUBSEP w SUBSEP "builtin") in per && per[r SUBSEP w SUBSEP "builtin"] > 0)
              rr = rr " " per[r SUBSEP w SUBSEP b] / per[r SUBSEP w SUBSEP "builtin"]
          rq = (k in req && gops[k] > 0) ? sprintf("%.2f", req[k] / gops[k]) : "– (QEMU)"
          sy = (k in req && req[k] > 0) ? sprintf("%.2f", syn[k] / req[k]) : "–"
          bs = (k in req && bat[k] > 0) ? sprintf("%.2f", req[k] / bat[k]) : "–"
          printf "| %s | %s | %d | %.0f | %s | %s | %s | %s | %s | %s |\n", title[w], b, cnt[k], m, minmax(v[k]), ratio, (b == "builtin" ? "–" : rminmax(rr)), rq, bs, sy
        }
      }
      print ""
      printf "Host CPU used by other processes during a boot (cores, median / max over boots): %.2f / %.2f", median(other), omax
      print (omax > 0.25 ? "  <-- the host was not idle: treat the figures as noisy" : "")
      print ""
      print "Goals (median over rounds, ratios from the same run):"
      goal("single-threaded fsync loop, datasync >= 1.30x built-in", med["fsync-1" SUBSEP "datasync"], med["fsync-1" SUBSEP "builtin"], 1.30)
      goal("single-threaded msync loop, datasync >= 1.30x built-in", med["msync-1" SUBSEP "datasync"], med["msync-1" SUBSEP "builtin"], 1.30)
      goal("4 writers, datasync >= 1.30x built-in (group commit)", med["fsync-4" SUBSEP "datasync"], med["fsync-4" SUBSEP "builtin"], 1.30)
      goal("4 writers, fsync mode >= 1.30x built-in (group commit)", med["fsync-4" SUBSEP "fsync"], med["fsync-4" SUBSEP "builtin"], 1.30)
      goal("4 msync writers, datasync >= 1.30x built-in (group commit)", med["msync-4" SUBSEP "datasync"], med["msync-4" SUBSEP "builtin"], 1.30)
      goal("volatile within 10% of the ceiling, fsync loop 1 thread", med["fsync-1" SUBSEP "volatile"], med["fsync-1" SUBSEP "ceiling"], 0.90)
      goal("volatile within 10% of the ceiling, msync loop 1 thread", med["msync-1" SUBSEP "volatile"], med["msync-1" SUBSEP "ceiling"], 0.90)
      goal("volatile within 10% of the ceiling, fsync loop 4 threads", med["fsync-4" SUBSEP "volatile"], med["fsync-4" SUBSEP "ceiling"], 0.90)
      goal("volatile within 10% of the ceiling, msync loop 4 threads", med["msync-4" SUBSEP "volatile"], med["msync-4" SUBSEP "ceiling"], 0.90)
    }
    function goal(what, a, b, target,   r) {
      if (a == "" || b == "" || b + 0 == 0) { printf "- %s: not measured\n", what; return }
      r = a / b
      if (r >= target) printf "- %s: %.2fx: met\n", what, r
      else printf "- %s: %.2fx: MISSED by %.0f%% (needs %.2fx, %.0f%% more ops/s)\n", what, r, (target - r) / target * 100, target, (target / r - 1) * 100
    }' "$WORK/results.tsv"
} | tee "$WORK/summary.md"
log "results: $WORK/results.tsv, summary: $WORK/summary.md, logs: $WORK/r*-*/"
if [ "$failures" != 0 ]; then
  log "$failures boot(s) FAILED"
  exit 1
fi
