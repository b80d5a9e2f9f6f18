#!/usr/bin/env bash
# Demo: boot the zone guest, snapshot it mid-run, restore the snapshot, and
# compare the final checksum with an uninterrupted run of the same cmdline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p forkd
forkd=target/release/forkd
snap=$(mktemp -d /tmp/forkd-demo.XXXXXX)
trap 'rm -rf "$snap"' EXIT
cmdline="ticks=250 seed=7 state_mib=32 alloc_mib=1 dirty_pages=50 tick_us=4000"
echo "== zone guest: $($forkd guest-path)"
echo "== cmdline: $cmdline (about 1 s of guest time)"
echo "== 1. uninterrupted run"
straight=$($forkd run --name straight --cmdline "$cmdline" --json | tee /dev/stderr | grep 'zone: done')
echo "== 2. the same run, paused and snapshotted after 500 ms"
$forkd run --name first-half --cmdline "$cmdline" --snapshot-after-ms 500 --snapshot-dir "$snap/zone" --json
ls -ls "$snap/zone"
echo "== 3. restore from the snapshot and run to the end"
restored=$($forkd restore "$snap/zone" --name restored --json | tee /dev/stderr | grep 'zone: done')
a=${straight##*checksum=}
b=${restored##*checksum=}
if [ "$a" = "$b" ]; then
    echo "== MATCH: the restored guest finished with checksum $b, same as the uninterrupted run"
else
    echo "== MISMATCH: uninterrupted $a, restored $b" >&2
    exit 1
fi
