#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Power cuts, counted: how many acknowledged records each durability mode keeps when
# the host loses power right after acknowledging them, and how many flush points the
# dm-log-writes replay checks.
#
# Drives the power_cut test binary (guest-tests/power_cut.rs; see its header for what
# one boot does). For each mode (datasync, fsync, volatile) it runs --cuts boots: a VM
# playing the host serves a prepared file with the daemon, the in-VM frontend writes
# --records numbered records with one FLUSH each and resets the machine right after
# an acknowledgement (the first cut after the last record, the others after one
# picked at random); the host reads the file back from the VM's disk. Then the
# log-writes check runs once in datasync mode (every flush point and mark of one boot,
# --log-records records) and once in volatile mode (its negative control: it must find
# lost records). Prints a table per part; a datasync or fsync run that lost an
# acknowledged record, a volatile run that lost none, or a log-writes run that
# disagrees with its mode is a failure (exit status 1).
#
# Usage: benches/power-cut.sh [--cuts N] [--records N] [--log-records N]
#                             [--modes "datasync fsync volatile"] [--no-log-writes]
#                             [--no-setup]
#   --cuts N         boots per mode (default 10)
#   --records N      records per power-cut boot (default 40)
#   --log-records N  records of the log-writes boots (default 2000)
#   --no-log-writes  skip the log-writes part
#   --no-setup       do not run guest-tests/setup.sh (the environment exists)
# Environment: VDP_POWER_CUT_SEED (cut positions and record contents), and
# VDP_GUEST_CACHE as for the tests.
# Results: $VDP_BENCH_DIR/power-cut (default /var/tmp/vhost-device-pmem-bench/power-cut):
# cuts.tsv, log-writes.tsv, summary.md and each test run's output. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=power-cut
# shellcheck source=benches/lib.sh
. benches/lib.sh

cuts=10 records=40 log_records=2000 modes="datasync fsync volatile" log_writes=1 setup=1
while [ $# -gt 0 ]; do
  case $1 in
    --cuts) cuts=$2; shift 2 ;;
    --records) records=$2; shift 2 ;;
    --log-records) log_records=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --no-log-writes) log_writes=0; shift ;;
    --no-setup) setup=0; shift ;;
    -h|--help) sed -n '3,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;/^set -e/d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ "$cuts" -ge 1 ] && [ "$records" -ge 1 ] && [ "$log_records" -ge 1 ] || die "bad --cuts/--records/--log-records"
[ "$(id -u)" = 0 ] || die "run as root (the guest tests need it)"

WORK=${VDP_BENCH_DIR:-/var/tmp/vhost-device-pmem-bench}/power-cut
rm -rf "$WORK"; mkdir -p "$WORK"
[ "$setup" = 1 ] && ./guest-tests/setup.sh
export VDP_REQUIRE_GUEST=1
log "building the power_cut test binary"
cargo test --locked --test power_cut --no-run >&2

# run_test NAME OUT [VAR=VALUE...]: one test of the power_cut binary, its stderr in
# OUT; returns the test's status.
run_test() {
  local name=$1 out=$2; shift 2
  env "$@" cargo test --locked --test power_cut -- --exact "$name" --nocapture --test-threads=1 \
    >"$out" 2>&1
}

failures=0
start=$(date +%s)
printf 'mode\tround\tacked\tintact\tlost\tlost_zero\tlost_other\tcut_after\tboot_secs\n' >"$WORK/cuts.tsv"
for mode in $modes; do
  case $mode in
    datasync|fsync) test=power_cut_$mode ;;
    volatile) test=power_cut_volatile_loses_records ;;
    *) die "unknown mode $mode" ;;
  esac
  log "$mode: $cuts cut(s) of up to $records records"
  rc=0
  run_test "$test" "$WORK/$mode.out" VDP_POWER_CUT_ROUNDS="$cuts" VDP_POWER_CUT_RECORDS="$records" || rc=$?
  grep -a -o 'VDP-POWER-CUT .*' "$WORK/$mode.out" | sed 's/^VDP-POWER-CUT //' |
    awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
           printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v["mode"], v["round"], v["records_acked"],
             v["records_intact"], v["lost"], v["lost_zero"], v["lost_other"], v["cut_after"], v["boot_secs"] }' \
    >>"$WORK/cuts.tsv"
  done_rounds=$(grep -c -a 'VDP-POWER-CUT ' "$WORK/$mode.out" || true)
  if [ "$rc" != 0 ] || [ "$done_rounds" != "$cuts" ]; then
    log "$mode: the test FAILED (status $rc, $done_rounds of $cuts boots reported); see $WORK/$mode.out"
    grep -a -E 'panicked|lost [0-9]+ of|kept all' "$WORK/$mode.out" | head -n 5 >&2 || true
    failures=$((failures + 1))
  fi
done

printf 'mode\trecords\tacked\tlog_entries\tflush_points\tflush_points_with_acks\tmarks\tcrash_points\tfailed_points\tfs_checks\tfs_failures\tboot_secs\treplay_secs\n' >"$WORK/log-writes.tsv"
if [ "$log_writes" = 1 ]; then
  for mode in datasync volatile; do
    log "log-writes, $mode: $log_records records, every flush point"
    rc=0
    run_test flush_points::log_writes_every_flush_point "$WORK/log-writes-$mode.out" \
      VDP_LOG_WRITES_MODE="$mode" VDP_LOG_WRITES_RECORDS="$log_records" || rc=$?
    line=$(grep -a -o 'VDP-LOG-WRITES .*' "$WORK/log-writes-$mode.out" | sed 's/ inside:.*//' || true)
    if [ -n "$line" ]; then
      printf '%s\n' "${line#VDP-LOG-WRITES }" | awk -v recs="$log_records" '
        { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
          printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v["mode"], recs, v["records_acked"],
            v["log_entries"], v["flush_points"], v["flush_points_with_acks"], v["marks"],
            v["crash_points_checked"], v["failed_points"], v["fs_checks"], v["fs_failures"],
            v["boot_secs"], v["replay_secs"] }' >>"$WORK/log-writes.tsv"
    fi
    if [ "$rc" != 0 ] || [ -z "$line" ]; then
      log "log-writes, $mode: the test FAILED (status $rc); see $WORK/log-writes-$mode.out"
      grep -a -E 'panicked|missing at|lost nothing' "$WORK/log-writes-$mode.out" | head -n 5 >&2 || true
      failures=$((failures + 1))
    fi
  done
fi
elapsed=$(( $(date +%s) - start ))

{
  echo "## Power cuts"
  echo
  echo "$cuts cut(s) per mode, up to $records records of 4 KiB per boot (one FLUSH each), the first cut after the last record, the others after a random one; accel=$(sed -n 's/.*accel=\([a-z]*\).*/\1/p' "$WORK"/*.out 2>/dev/null | head -n1); $elapsed s in all."
  echo
  echo "| mode | cuts | records acked | records lost | runs that lost data | median boot (s) |"
  echo "|---|---:|---:|---:|---:|---:|"
  awk -F'\t' -v modes="$modes" '
    NR == 1 { next }
    { n[$1]++; acked[$1] += $3; lost[$1] += $5; if ($5 > 0) runs[$1]++; b[$1] = b[$1] " " $9 }
    function median(s,   k, a, i, j, t) {
      k = split(s, a, " ")
      for (i = 2; i <= k; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j+1] = a[j]; a[j+1] = t }
      return k % 2 ? a[(k+1)/2] : (a[k/2] + a[k/2+1]) / 2
    }
    END {
      m = split(modes, order, " ")
      for (i = 1; i <= m; i++) { x = order[i]; if (!(x in n)) continue
        printf "| %s | %d | %d | %d | %d | %.1f |\n", x, n[x], acked[x], lost[x], runs[x] + 0, median(b[x]) }
    }' "$WORK/cuts.tsv"
  if [ "$log_writes" = 1 ]; then
    echo
    echo "## Every flush point (dm-log-writes replay)"
    echo
    echo "| mode | records acked | log entries | flush points | marks | crash points checked | points with lost records | fs repairs checked | boot (s) | replay (s) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' 'NR > 1 { printf "| %s | %s | %s | %s | %s | %s | %s | %s (%s failed) | %s | %s |\n",
      $1, $3, $4, $5, $7, $8, $9, $10, $11, $12, $13 }' "$WORK/log-writes.tsv"
  fi
  echo
  [ "$failures" = 0 ] && echo "Every run behaved as its mode promises." \
    || echo "**$failures part(s) FAILED** (see the .out files in $WORK)."
} >"$WORK/summary.md"
cat "$WORK/summary.md"
log "results in $WORK (cuts.tsv, log-writes.tsv, summary.md)"
[ "$failures" = 0 ]
