#!/usr/bin/env bash
# The whole test suite: set-up, formatting and lint gates, then every test
# (unit tests and the end-to-end tests on real KVM VMs, with QEMU as oracle).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all --check
(cd zone-guest && cargo fmt --check)
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd zone-guest && cargo clippy --release -- -D warnings)
echo "== build (the end-to-end tests run the forkd binary)"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace
