#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds statically linked binaries that drop into any guest (busybox initramfs, the
# DAX host lab): the guest agent and the daemon, into target/static/. Prints the
# directory holding them. Idempotent (cargo rebuilds only what changed).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --release \
  --target "$target" --target-dir target/static \
  --bin vhost-device-pmem --bin vhost-device-pmem-agent >&2
echo "$PWD/target/static/$target/release"
