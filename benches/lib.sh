# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Shared helpers of the guest benchmarks (sourced by guest-flush.sh and memory.sh):
# the guest environment, building the daemon and the guest program, fully written
# ext4 images, the daemon process, QEMU boots and host CPU accounting.
# Expects `set -euo pipefail` and the repository root as the working directory.

log() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Loads (and if needed makes) the guest environment, builds the daemon (release) and
# the static guest program. Sets DAEMON_BIN, FLUSHBENCH, VDP_* from env.sh.
bench_init() {
  [ "$(id -u)" = 0 ] || die "run as root (mounts, loop devices, QEMU)"
  local missing=()
  command -v gcc >/dev/null || missing+=(gcc)
  [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
  command -v filefrag >/dev/null || [ -x /usr/sbin/filefrag ] || missing+=(e2fsprogs)
  command -v cpio >/dev/null || missing+=(cpio)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing host packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  ./guest-tests/setup.sh
  # shellcheck disable=SC1091
  . "${VDP_GUEST_CACHE:-/var/tmp/vhost-device-pmem-guest}/env.sh"
  VDP_ACCEL=${VDP_ACCEL_OVERRIDE:-$VDP_ACCEL}
  log "building the daemon (cargo build --release --locked)"
  cargo build --release --locked >&2
  DAEMON_BIN=$PWD/target/release/vhost-device-pmem
  FLUSHBENCH=$WORK/flushbench
  gcc -static -O2 -Wall -pthread -o "$FLUSHBENCH" benches/guest/flushbench.c
}

# VDP_BENCH_NICE=N runs QEMU and the daemon under `nice -n N` (e.g. -10 on a host
# shared with other work: the measured processes then win the CPU more often).
BENCH_NICE=()
[ -n "${VDP_BENCH_NICE:-}" ] && BENCH_NICE=(nice -n "$VDP_BENCH_NICE")

# QEMU from the setup's trixie tree, run through that tree's dynamic loader.
qemu_cmd() {
  local r=$VDP_QEMU_ROOT
  QEMU=("$r/lib64/ld-linux-x86-64.so.2" --library-path "$r/lib/x86_64-linux-gnu:$r/usr/lib/x86_64-linux-gnu"
        "$r/usr/bin/qemu-system-x86_64" -L "$r/usr/share/qemu" -L "$r/usr/share/seabios")
}

# check_written FILE: every block of FILE is in an allocated, written, unshared extent
# (no holes, no unwritten/shared/inline/delalloc extents). Prints the problems.
check_written() {
  filefrag -v "$1" | awk '
    /^File size of/ { for (i = 1; i <= NF; i++) if ($i == "blocks") n = substr($(i-1), 2) + 0 }
    /^ *[0-9]+:/ {
      line = $0; gsub(/\.\./, " ", line); gsub(/:/, " ", line); split(line, f, " ")
      start = f[2] + 0; end = f[3] + 0
      if (start != cursor) { printf "hole at blocks %d..%d\n", cursor, start - 1; bad = 1 }
      flags = ""; if (f[length(f)] ~ /[a-z]/) flags = f[length(f)]
      nf = split(flags, fl, ",")
      for (i = 1; i <= nf; i++) if (fl[i] != "last" && fl[i] != "eof" && fl[i] != "merged") {
        printf "extent at blocks %d..%d is %s\n", start, end, fl[i]; bad = 1
      }
      cursor = end + 1
    }
    END {
      if (cursor != n) { printf "blocks %d..%d not mapped\n", cursor, n - 1; bad = 1 }
      exit bad
    }'
}

# write_unwritten FILE: rewrites, in place, every unwritten or missing range with the
# bytes it reads as (zeros), which turns those extents into written ones.
write_unwritten() {
  local f=$1
  filefrag -v "$f" | awk '
    /^File size of/ { for (i = 1; i <= NF; i++) if ($i == "blocks") n = substr($(i-1), 2) + 0 }
    /^ *[0-9]+:/ {
      line = $0; gsub(/\.\./, " ", line); gsub(/:/, " ", line); split(line, f, " ")
      start = f[2] + 0; end = f[3] + 0
      if (start > cursor) print cursor, start - cursor
      if (f[length(f)] ~ /unwritten/) print start, end - start + 1
      cursor = end + 1
    }
    END { if (cursor < n) print cursor, n - cursor }' |
  while read -r start count; do
    dd if="$f" of="$f" bs=4096 skip="$start" seek="$start" count="$count" conv=notrunc status=none
  done
  sync -d "$f" 2>/dev/null || sync "$f"
}

# make_ext4_image IMG SIZE_MIB SEED_DIR: a fully written ext4 image (4 KiB blocks, as
# DAX needs) holding a copy of SEED_DIR, with an immutable block map: every byte
# written, no unwritten extents (mke2fs zeroes ranges with fallocate unless told not
# to; anything left is rewritten in place), checked with filefrag.
make_ext4_image() {
  local img=$1 mib=$2 seed=$3
  rm -f "$img"
  # Direct I/O: a 64 GiB region must not go through (and flush out) the page cache.
  dd if=/dev/zero of="$img" bs=1M count="$mib" oflag=direct conv=fsync status=none
  UNIX_IO_NOZEROOUT=1 mkfs.ext4 -q -F -b 4096 -E nodiscard -d "$seed" "$img"
  sync -d "$img" 2>/dev/null || sync "$img"
  if ! check_written "$img" >/dev/null; then
    log "$img: rewriting unwritten ranges left by mkfs"
    write_unwritten "$img"
  fi
  check_written "$img" >&2 || die "$img still has a mutable block map (filefrag -v $img)"
  chmod 600 "$img"
}

# copy_image SRC DST: a fresh, fully written copy (dd writes every byte, then fsync).
# On tmpfs there is no block map to check.
copy_image() {
  rm -f "$2"
  dd if="$1" of="$2" bs=1M conv=fsync status=none
  chmod 600 "$2"
  [ "$(stat -f -c %T "$2")" = tmpfs ] && return 0
  check_written "$2" >&2 || die "$2: copy has a mutable block map"
}

# make_initrd DIR SCRIPT: the base initramfs plus /test.sh (SCRIPT) and /flushbench.
make_initrd() {
  local dir=$1 script=$2 stage=$1/initrd.d
  rm -rf "$stage"; mkdir -p "$stage"
  printf '#!/bin/sh\n%s\n' "$script" >"$stage/test.sh"
  cp "$FLUSHBENCH" "$stage/flushbench"
  chmod 755 "$stage/test.sh" "$stage/flushbench"
  (cd "$stage" && printf 'test.sh\nflushbench\n' | cpio -o -H newc --quiet) >"$dir/extra.cpio"
  cat "$VDP_INITRAMFS" "$dir/extra.cpio" >"$dir/initrd"
}

# start_daemon DIR FILE MODE: starts `serve` (DAEMON_PID), waits for its sockets and
# checks that the policy in force is MODE.
start_daemon() {
  local dir=$1 file=$2 mode=$3
  rm -f "$dir/vu.sock" "$dir/ctl.sock"
  "${BENCH_NICE[@]}" "$DAEMON_BIN" serve --socket-path "$dir/vu.sock" --file "$file" --mode "$mode" \
    --control-socket "$dir/ctl.sock" 2>"$dir/daemon.log" &
  DAEMON_PID=$!
  local i
  for i in $(seq 200); do
    [ -S "$dir/vu.sock" ] && [ -S "$dir/ctl.sock" ] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$dir/daemon.log" >&2; die "daemon exited at start"; }
    sleep 0.05
  done
  [ -S "$dir/ctl.sock" ] || die "daemon did not listen within 10 s ($dir/daemon.log)"
  "$DAEMON_BIN" status --control-socket "$dir/ctl.sock" >"$dir/status.json"
  grep -q "\"policy\": \"$mode\"" "$dir/status.json" \
    || die "daemon policy is not $mode: $(grep '"policy' "$dir/status.json")"
}

# stop_daemon: SIGTERM, wait, fail on a non-zero exit.
stop_daemon() {
  [ -n "${DAEMON_PID:-}" ] || return 0
  kill -TERM "$DAEMON_PID" 2>/dev/null || true
  local rc=0
  wait "$DAEMON_PID" || rc=$?
  DAEMON_PID=
  [ "$rc" = 0 ] || { log "daemon exited with status $rc"; return 1; }
}

# stats_field JSON_FILE NAME: an integer field of a `stats` answer.
stats_field() {
  sed -n "s/^ *\"$2\": \([0-9]*\).*/\1/p" "$1" | head -n1
}

# Host CPU accounting, in clock ticks: everything busy on the host, and one process.
host_busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
proc_ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
CLK_TCK=$(getconf CLK_TCK)

# host_other_load SECONDS: host CPU busy (in cores) over SECONDS, all processes.
host_load() {
  local b0 b1
  b0=$(host_busy_ticks); sleep "$1"; b1=$(host_busy_ticks)
  awk -v b="$((b1 - b0))" -v s="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", b / hz / s }'
}

# wait_for_quiet MAX_SECONDS: waits (at most MAX_SECONDS) until the host is nearly
# idle (< 0.25 cores busy over 2 s), so that other work on the machine disturbs a
# measurement less. Prints the last load seen.
wait_for_quiet() {
  local max=$1 waited=0 load
  load=$(host_load 1)
  while awk -v l="$load" 'BEGIN { exit !(l >= 0.25) }' && [ "$waited" -lt "$max" ]; do
    load=$(host_load 2); waited=$((waited + 2))
  done
  [ "$waited" -gt 0 ] && log "waited ${waited}s for a quiet host (load now $load cores)"
  echo "$load"
}
