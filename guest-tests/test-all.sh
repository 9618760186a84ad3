#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The README's test command: sets up the guest environment (QEMU >= 11.1 in a
# debootstrap'd tree, guest kernel, initramfs; cached under /var/tmp) and runs every
# test, with the root-only and guest tests required rather than skipped. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-all.sh: run as root (loop devices, mounts, debootstrap)" >&2; exit 1; }
./guest-tests/setup.sh
VDP_LIBVIRT_ROOT=$(./guest-tests/libvirt-root.sh)
export VDP_LIBVIRT_ROOT VDP_REQUIRE_LIBVIRT=1
VDP_OPERATOR_IMAGE=$(./guest-tests/operator-host.sh)
export VDP_OPERATOR_IMAGE
export VDP_REQUIRE_GUEST=1 VDP_REQUIRE_ROOT_TESTS=1
cargo test --locked -- --test-threads=2
