#!/usr/bin/env bash
# Demo: boot the zone guest, snapshot it mid-run, restore the snapshot, and
# compare the final checksum with an uninterrupted run of the same cmdline;
# then fork the zone into 4 clones and check each against QEMU running the
# same ELF straight-line as that clone.
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

fork="ticks=40 seed=7 state_mib=32 alloc_mib=2 dirty_pages=50 fork_at=10 clones=4"
echo "== 4. VM fork: $fork"
$forkd run --cmdline "$fork" --json | tee "$snap/fork.out" | grep -v '^{'
tail -1 "$snap/fork.out" | python3 -c '
import json, sys
f = json.load(sys.stdin)["fork"]
print("   descriptor %d bytes, clone start p50 %.1f ms (max %.1f), pages fetched %d, "
      "prefetched %d, avoided %d, memory server sent %.1f MiB"
      % (f["descriptor_bytes"], f["clone_start_ms_p50"], f["clone_start_ms_max"],
         f["pages_fetched"], f["pages_prefetched"], f["pages_avoided"],
         f["memserver_bytes_sent"] / 2**20))'
echo "== 5. QEMU, the same ELF straight-line as each VM of the fork (as_clone=I)"
elf=$($forkd guest-path)
for i in 0 1 2 3 4; do
    want=$(timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities \
        -m 512 -nographic -no-reboot -device isa-debug-exit,iobase=0xf4 -kernel "$elf" \
        -append "$fork as_clone=$i" | grep 'zone: done' | tr -d '\r' || true)
    if [ "$i" = 0 ]; then got=$(grep '^zone: done' "$snap/fork.out"); else
        got=$(grep "^\[clone-$i\] zone: done" "$snap/fork.out" | sed 's/^\[clone-[0-9]*\] //'); fi
    if [ -n "$want" ] && [ "$got" = "$want" ]; then echo "   MATCH  $got"
    else echo "   MISMATCH forkd '$got' QEMU '$want'" >&2; exit 1; fi
done
