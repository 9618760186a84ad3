#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# What an operator does on a stock Debian 13 host, run inside the VM that plays one
# (guest-tests/operator_host.rs boots it with systemd as PID 1 and runs this as the
# kernel command line's systemd.run= unit). Follows docs/operations.md, "A Debian 13
# host, step by step", with the same paths. Its only input is the test's disk,
# mounted on $E: the project's .deb, the seeded image, the adapted domain XML and
# the nested guest's kernel and initramfs.
#
# It decides nothing: it prints what it saw on the console, one line each,
#   VDP-E2E-STEP NAME          a step begins
#   VDP-E2E KEY: TEXT          evidence (the test asserts on it)
#   L2: TEXT                   the nested guest's console
#   VDP-E2E-FAIL WHAT          a step failed (then VDP-RESULT 1)
#   VDP-RESULT RC
# and the test on the host judges it.
set -u
E=${1:-/e2e}
exec >/dev/ttyS0 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_COLORS=0 SYSTEMD_PAGER=

I=vm0-pmem0
FILE=/var/lib/vhost-device-pmem/$I/pmem.img
RUN=/run/vhost-device-pmem/$I
CONTROL=$RUN/control.sock
PROM=/var/lib/prometheus/node-exporter/vhost-device-pmem-$I.prom
SERIAL=/var/log/libvirt/qemu/vm0-serial.log
export LIBVIRT_DEFAULT_URI=qemu:///system

step() { echo "VDP-E2E-STEP $*"; }
# Evidence: KEY and each line of what the command printed; its exit status too.
ev() {
  local key=$1 rc
  shift
  "$@" 2>&1 | sed -u "s/^/VDP-E2E $key: /"
  rc=${PIPESTATUS[0]}
  echo "VDP-E2E $key-rc: $rc"
  return "$rc"
}
# Evidence on one line, its lines joined by spaces (JSON documents).
ev1() {
  local key=$1
  shift
  echo "VDP-E2E $key: $("$@" 2>&1 | tr '\n' ' ' | sed 's/ *$//')"
}
fail() {
  echo "VDP-E2E-FAIL $*"
  ev journal-all journalctl -b --no-pager -n 60 -o short-monotonic
  ev libvirt-log cat /var/log/libvirt/qemu/vm0.log
  echo "VDP-RESULT 1"
  exit 1
}
# Waits up to $2 seconds for the nested guest's console to say $1.
wait_l2() {
  local i
  for ((i = 0; i < $2; i++)); do
    grep -q "$1" "$SERIAL" 2>/dev/null && return 0
    sleep 1
  done
  return 1
}
relay_l2() {
  tail -n +1 -F "$SERIAL" 2>/dev/null | sed -u -e 's/\r$//' -e 's/^/L2: /' &
  RELAY=$!
}
vmm_pid() { cat /run/libvirt/qemu/vm0.pid; }

step host
# systemd.run= makes this unit's target the boot's default: bring up the rest of
# the host, as it boots without us (sockets, libvirtd, node_exporter).
ev boot timeout 600 systemctl start multi-user.target
ev1 default-target systemctl get-default
ev1 pid1 cat /proc/1/comm
ev1 apparmor-enabled cat /sys/module/apparmor/parameters/enabled
# Does this kernel mediate a connect to a unix socket by its path? AppArmor's
# af_unix mediation (Ubuntu's kernels; upstream Linux 6.17, for policy of its new
# ABI) shows as features/network*/af_unix; without it only the compiled profile
# below can show the package's rules.
ev1 aa-af-unix sh -c 'ls -d /sys/kernel/security/apparmor/features/network*/af_unix 2>/dev/null || echo none'
ev1 os-release sh -c '. /etc/os-release; echo "$PRETTY_NAME"'
ev1 libvirt-version dpkg-query -W -f '${Version}' libvirt-daemon-system
ev1 qemu-version dpkg-query -W -f '${Version}' qemu-system-x86
ev1 id-libvirt-qemu id libvirt-qemu
ev1 libvirt-units systemctl list-units --no-legend --plain 'libvirtd*' 'virtqemud*'

step install
ev dpkg dpkg -i "$E"/vhost-device-pmem_*.deb || fail "dpkg -i"
ev1 units systemctl list-unit-files --no-legend 'vhost-device-pmem*'

step instance
install -D -m 0644 /usr/share/doc/vhost-device-pmem/examples/instance.toml "/etc/vhost-device-pmem/$I.toml" || fail "instance.toml"
install -d -m 0700 "/var/lib/vhost-device-pmem/$I" || fail "state dir"
cp "$E/seed.img" "$FILE" || fail "copy the seeded image"
ev prepare vhost-device-pmem prepare "$FILE" || fail prepare
ev1 check vhost-device-pmem check "$FILE" --json

step metrics
install -d /var/lib/prometheus/node-exporter
install -D -m 0644 /usr/share/doc/vhost-device-pmem/examples/metrics.conf \
  /etc/systemd/system/vhost-device-pmem@.service.d/metrics.conf || fail "metrics drop-in"
sed -i -e 's|^# metrics-file = |metrics-file = |' -e 's|^# metrics-instance = |metrics-instance = |' \
  "/etc/vhost-device-pmem/$I.toml"
ev instance-toml grep -E '^[a-z]' "/etc/vhost-device-pmem/$I.toml"
systemctl daemon-reload

step sockets
ev enable systemctl enable --now "vhost-device-pmem@$I.socket" "vhost-device-pmem-control@$I.socket" \
  || fail "enable the sockets"
ev start systemctl start "vhost-device-pmem@$I" || fail "start the instance"
ev ls-run ls -ln "$RUN"
ev1 stat-dirs stat -c '%n %a %U:%G' /run/vhost-device-pmem "$RUN" "$RUN/vhost-user.sock" \
  "$RUN/control.sock" "$RUN/agent.sock"

step domain
install -d /var/lib/libvirt/boot
install -m 0644 "$E/l2-vmlinuz" "$E/l2-initrd" /var/lib/libvirt/boot/ || fail "L2 kernel"
ev define virsh define "$E/vm0.xml" || fail "virsh define"
relay_l2
ev start1 virsh start vm0 || fail "virsh start (first)"
Q1=$(vmm_pid)
ev1 vmm1 ps -o pid=,user:32=,comm= -p "$Q1"
ev1 vmm1-label cat "/proc/$Q1/attr/current"
ev aa-status aa-status
# The profile libvirt compiled for this domain, its includes expanded: the rules
# of the package's abstractions/libvirt-qemu.d file must be in it.
PROFILE=$(sed 's/ (enforce)$//' "/proc/$Q1/attr/current")
ev aa-domain sh -c "apparmor_parser -p '/etc/apparmor.d/libvirt/$PROFILE' | grep -F /run/vhost-device-pmem/"
wait_l2 VDP-L2-DONE 900 || fail "the nested guest did not finish (first boot)"
ev1 status1 vhost-device-pmem status --control-socket "$CONTROL" --json
ev1 taint grep -c 'is tainted: custom-argv' /var/log/libvirt/qemu/vm0.log

step restart
ev destroy1 virsh destroy vm0 || fail "virsh destroy (first)"
kill "$RELAY" 2>/dev/null
mv "$SERIAL" "$SERIAL.1"
# The daemon syncs at the disconnect and waits for the next VMM.
for ((i = 0; i < 60; i++)); do
  journalctl -q -u "vhost-device-pmem@$I" -g 'the VMM disconnected' --no-pager | grep -q . && break
  sleep 1
done
ev1 status-between vhost-device-pmem status --control-socket "$CONTROL" --json
ev start2 virsh start vm0 || fail "virsh start (second)"
relay_l2
Q2=$(vmm_pid)
ev1 vmm2 ps -o pid=,user:32=,comm= -p "$Q2"
wait_l2 VDP-L2-DONE 900 || fail "the nested guest did not finish (second boot)"
ev1 status2 vhost-device-pmem status --control-socket "$CONTROL" --json

step metrics-scrape
# Wait for a write of the metrics file after the second connection, then ask
# node_exporter (its textfile collector) what it read from it.
for ((i = 0; i < 30; i++)); do
  grep -q "vhost_device_pmem_connections_total.* 2$" "$PROM" 2>/dev/null && break
  sleep 1
done
ev1 prom-stat stat -c '%n %a %U:%G' "$PROM"
ev prom grep -E '^vhost_device_pmem_(connected|connections_total|up)' "$PROM"
ev1 node-exporter systemctl is-active prometheus-node-exporter
scrape() {
  exec 3<>/dev/tcp/127.0.0.1/9100 || return 1
  printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  grep -E '^vhost_device_pmem_connections_total|^node_textfile_scrape_error' <&3
  exec 3<&-
}
ev scrape scrape

step stop
ev destroy2 virsh destroy vm0
kill "$RELAY" 2>/dev/null
ev stop systemctl stop "vhost-device-pmem@$I"
ev1 service-result systemctl show -p Result -p ExecMainStatus "vhost-device-pmem@$I"

step journal
ev journal journalctl -u "vhost-device-pmem@$I" -p info --no-pager -o json \
  --output-fields=PRIORITY,MESSAGE,SYSLOG_IDENTIFIER
ev journal-err journalctl -u "vhost-device-pmem@$I" -p err --no-pager -o cat

echo "VDP-RESULT 0"
