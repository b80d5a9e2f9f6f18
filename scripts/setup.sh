#!/usr/bin/env bash
# Installs what building and testing forkd needs on a fresh Debian machine
# with rustup: the guest's target, QEMU (the tests' independent oracle) and
# libclang (bindgen, for the userfaultfd crate).
set -euo pipefail
if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
    echo "setup: adding the x86_64-unknown-none target (zone guest)"
    rustup target add x86_64-unknown-none
fi
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# The userfaultfd crate generates its bindings with bindgen, which needs libclang.
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi
if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing; forkd and its tests need KVM" >&2
fi
