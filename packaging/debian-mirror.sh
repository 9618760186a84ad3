#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Prints the Debian mirror this machine's apt uses (deb822 sources first, then
# one-line ones), for the scripts that debootstrap a tree: guest-tests/setup.sh and
# packaging/fresh-debian-root.sh. Exits 1 with a message if there is none.
set -euo pipefail
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | tr ' ' '\n' | grep -v -- -security | grep . | head -n1 || true)
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; exit } }' \
    | grep -v -- -security | head -n1 || true)
fi
[ -n "$mirror" ] || { echo "debian-mirror: no Debian mirror found in the apt configuration" >&2; exit 1; }
echo "$mirror"
