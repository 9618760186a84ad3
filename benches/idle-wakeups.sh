#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Wake-ups of idle daemons: starts N `serve` daemons (each its own 2 MiB file,
# control socket and metrics off, no VMM connected), lets them settle, then counts
# the context switches of all their threads (voluntary + involuntary, summed over
# /proc/PID/task/*/status) over an interval. An idle daemon should make none: every
# wake-up is paid by every daemon of a host with many VMs.
#
# With --baseline BIN the same is measured for another build in the same run (e.g.
# a checkout of an earlier commit: `git worktree add /tmp/base REV && cargo build
# --release --manifest-path /tmp/base/Cargo.toml`), and the table gives the ratio.
#
# Usage: benches/idle-wakeups.sh [--daemons N] [--seconds S] [--baseline BIN]
#                                [--current BIN] [--extra "ARGS"]
#   --daemons   idle daemons per binary (default 16)
#   --seconds   the counting interval (default 60)
#   --baseline  a second binary to measure the same way
#   --current   the binary to measure (default: this checkout, built --release)
#   --extra     more `serve` arguments for every daemon (e.g. "--verify-interval 0")
# Prints a table; leaves nothing behind. Needs no root.
set -euo pipefail
cd "$(dirname "$0")/.."

daemons=16 seconds=60 baseline="" current="" extra=""
while [ $# -gt 0 ]; do
  case $1 in
    --daemons) daemons=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --baseline) baseline=$2; shift 2 ;;
    --current) current=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    *) echo "usage: $0 [--daemons N] [--seconds S] [--baseline BIN] [--current BIN] [--extra ARGS]" >&2; exit 2 ;;
  esac
done

if [ -z "$current" ]; then
  cargo build --release --locked >&2
  current=$PWD/target/release/vhost-device-pmem
fi
work=$(mktemp -d /tmp/vdp-idle.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Total context switches of every thread of `pid`.
switches() {
  local total=0 n
  for st in /proc/"$1"/task/*/status; do
    n=$(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {s += $2} END {print s + 0}' "$st" 2>/dev/null || echo 0)
    total=$((total + n))
  done
  echo "$total"
}

# Starts `daemons` idle daemons of binary $2 (label $1); their pids in `started`.
start_daemons() {
  local label=$1 bin=$2 i dir
  for i in $(seq 1 "$daemons"); do
    dir=$work/$label-$i
    mkdir -p "$dir"
    head -c $((2 << 20)) /dev/zero >"$dir/img"
    # shellcheck disable=SC2086
    RUST_LOG=warn "$bin" serve --socket-path "$dir/s" --file "$dir/img" --mode fsync $extra \
      </dev/null >/dev/null 2>"$dir/log" &
    started+=($!)
  done
}

# Measures binary $2 (label $1): appends "label total per-daemon-per-second
# threads" to `rows`.
measure() {
  local label=$1 bin=$2 mine=() p before=() after=() sum=0 threads=0
  started=()
  start_daemons "$label" "$bin"
  mine=("${started[@]}")
  pids+=("${mine[@]}")
  # Start-up done (listening, filter in place) long before this.
  sleep 5
  for p in "${mine[@]}"; do before+=("$(switches "$p")"); done
  sleep "$seconds"
  for i in "${!mine[@]}"; do
    p=${mine[$i]}
    kill -0 "$p" || { echo "$label: daemon $p died: $(cat "$work/$label-$((i + 1))/log")" >&2; exit 1; }
    after=$(switches "$p")
    sum=$((sum + after - ${before[$i]}))
    threads=$((threads + $(ls /proc/"$p"/task | wc -l)))
  done
  for p in "${mine[@]}"; do kill "$p"; done
  wait "${mine[@]}" 2>/dev/null || true
  rows+=("$(awk -v l="$label" -v s="$sum" -v n="$daemons" -v t="$seconds" -v th="$threads" \
    'BEGIN { printf "%s\t%d\t%.3f\t%.1f\n", l, s, s / n / t, th / n }')")
}

rows=()
if [ -n "$baseline" ]; then measure baseline "$baseline"; fi
measure current "$current"

printf '\n%d idle daemons per binary, %d s, no VMM connected (extra: %s)\n\n' "$daemons" "$seconds" "${extra:-none}"
printf '| binary | context switches, all daemons | per daemon per second | threads per daemon |\n'
printf '|---|---|---|---|\n'
for r in "${rows[@]}"; do
  IFS=$'\t' read -r l s per th <<<"$r"
  printf '| %s | %s | %s | %s |\n' "$l" "$s" "$per" "$th"
done
if [ -n "$baseline" ]; then
  b=$(printf '%s\n' "${rows[0]}" | cut -f3)
  c=$(printf '%s\n' "${rows[1]}" | cut -f3)
  awk -v b="$b" -v c="$c" 'BEGIN {
    if (b > 0) printf "\ncurrent / baseline wake-ups: %.3f\n", c / b;
    else print "\nbaseline made no wake-ups";
  }'
fi
