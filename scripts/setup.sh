#!/usr/bin/env bash
# Installs what building and testing forkd needs on a fresh Debian machine
# with rustup: the guest's target, QEMU (the tests' independent oracle),
# libclang (bindgen, for the userfaultfd crate), etcd (the cluster's state)
# and protoc (the etcd client's build).
set -euo pipefail
if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
    echo "setup: adding the x86_64-unknown-none target (zone guest)"
    rustup target add x86_64-unknown-none
fi
# True when the Debian package is installed (not merely known or removed).
installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# The userfaultfd crate generates its bindings with bindgen, which loads
# libclang.so (clang-sys) and needs clang's builtin headers. Machine images
# may ship libclang-cpp (the C++ library), which is not it: check for the
# package that provides both, not for a file name pattern.
installed libclang-dev || missing+=(libclang-dev)
command -v cc >/dev/null || missing+=(gcc)
installed linux-libc-dev || missing+=(linux-libc-dev)
# The multicast tests run in private network namespaces (unshare, ip).
command -v unshare >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
# Loss injection in the cluster tests (this kernel has no netem).
command -v nft >/dev/null || missing+=(nftables)
# The demo reads JSON with python3 and asks a daemon's API with curl.
command -v python3 >/dev/null || missing+=(python3)
command -v curl >/dev/null || missing+=(curl)
# The local cluster keeps its state in etcd (forkd cluster up starts one);
# the etcd-client crate's build compiles etcd's protobufs with protoc.
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi
if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing; forkd and its tests need KVM" >&2
fi
