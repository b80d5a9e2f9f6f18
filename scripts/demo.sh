#!/usr/bin/env bash
# Demo: boot the zone guest, snapshot it mid-run, restore the snapshot, and
# compare the final checksum with an uninterrupted run of the same cmdline;
# then fork the zone into 4 clones and check each against QEMU running the
# same ELF straight-line as that clone; then make a local cluster of 3 hosts
# (network namespaces) and fork a zone on h1 into 6 clones over h1, h2 and
# h3 with its pages by IP multicast, each checked against QEMU; then
# live-migrate a running zone from h1 to h2 and back by post-copy, and check its end against QEMU;
# then let the policy engine of a 2-host cluster migrate a zone off an overloaded host, checked against QEMU.
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
print("   descriptor %d bytes, clone start p50 %.1f ms (max %.1f), pages read from the "
      "frozen image on demand %d, ahead %d, avoided (zero-filled) %d"
      % (f["descriptor_bytes"], f["clone_start_ms_p50"], f["clone_start_ms_max"],
         f["pages_fetched"], f["pages_prefetched"], f["pages_avoided"]))'
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

echo "== 6. VM fork across hosts: a local cluster of 3 hosts (network namespaces, a forkd serve each)"
cluster="demo$((RANDOM % 100000))"
cdir="$snap/cluster"
trap '$forkd cluster down --name "$cluster" --dir "$cdir" >/dev/null 2>&1 || true; rm -rf "$snap"' EXIT
$forkd cluster up --hosts 3 --name "$cluster" --dir "$cdir"
on_h1=(--host h1 --cluster "$cluster" --cluster-dir "$cdir")
zone="ticks=200 seed=38 state_mib=8 dirty_pages=10 tick_us=5000"
id=$($forkd vm create "${on_h1[@]}" --mem 512 --cmdline "$zone" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "   $id on h1: $zone"
for _ in $(seq 200); do   # until the guest agent is up (a fork before is refused: 409)
    $forkd vm console "$id" "${on_h1[@]}" | grep -q 'zone: start' && break
    sleep 0.01
done
echo "   fork into 6 clones, 2 per host, pages by IP multicast (h1's clones read the image directly)"
$forkd vm fork "$id" "${on_h1[@]}" --clones 6 --place h1=2,h2=2,h3=2 --distribution multicast \
    --wait --json > "$snap/family.json"
for _ in $(seq 500); do
    $forkd vm get "$id" "${on_h1[@]}" --json | grep -q '"state":"exited"' && break
    sleep 0.02
done
$forkd vm get "$id" "${on_h1[@]}"
$forkd vm list --host h2 --cluster "$cluster" --cluster-dir "$cdir"
curl -s --unix-socket "$cdir/h1/api.sock" localhost/v1/memserver | python3 -c '
import json, sys
m = json.load(sys.stdin)["multicast"]
print("   h1 memory server: %.1f MiB multicast (%d pages pushed, %d on request, %d requests answered once for all)"
      % (m["bytes_sent"] / 2**20, m["blocks_pushed"], m["blocks_multicast"], m["lockstep_suppressed"]))'
python3 -c '
import json, sys
for r in json.load(open(sys.argv[1])).get("receivers", []):
    print("   receiver on %s: %d pages arrived (%d pushed), %d re-requests, %d frames rejected"
          % (r["host"], r["pages_arrived"], r["pages_pushed"], r["re_requests"],
             r["forged"] + r["replayed"] + r["foreign"]))' "$snap/family.json"
tick=$($forkd vm console "$id" "${on_h1[@]}" | sed -n 's/^zone: forked by the host before tick \([0-9]*\): clone=0$/\1/p')
echo "== 7. QEMU, straight-line as each VM of that fork (fork_at=$tick clones=6 as_clone=I)"
for i in 0 1 2 3 4 5 6; do
    want=$(timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities \
        -m 512 -nographic -no-reboot -device isa-debug-exit,iobase=0xf4 -kernel "$elf" \
        -append "$zone fork_at=$tick clones=6 as_clone=$i" | grep 'zone: done' | tr -d '\r' || true)
    if [ "$i" = 0 ]; then
        got=$($forkd vm get "$id" "${on_h1[@]}" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["last_line"])')
        where=h1
    else
        info=$(python3 -c '
import json, sys
c = [c for c in json.load(open(sys.argv[1]))["clones"] if c["clone_id"] == int(sys.argv[2])][0]
print(c.get("host") or "h1")
print(c.get("last_line"))' "$snap/family.json" "$i")
        where=$(head -1 <<<"$info")
        got=$(tail -n +2 <<<"$info")
    fi
    if [ -n "$want" ] && [ "$got" = "$want" ]; then echo "   MATCH  [$where] $got"
    else echo "   MISMATCH [$where] forkd '$got' QEMU '$want'" >&2; exit 1; fi
done
echo "== 8. live migration: a running zone moves h1 → h2 (pre-copy, 30 ms downtime budget), then back by post-copy"
mig="ticks=500 seed=5 state_mib=32 dirty_pages=16 tick_us=5000"
id=$($forkd vm create "${on_h1[@]}" --mem 512 --cmdline "$mig" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "   $id on h1: $mig"
sleep 0.5
$forkd vm migrate "$id" "${on_h1[@]}" --to h2 --downtime-ms 30 --wait --json > "$snap/migration.json"
dest=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["report"]
print("   migrated in %d rounds, %.1f MiB sent, downtime %.1f ms, total %.0f ms" % (
    r["rounds"], r["bytes_sent"] / 2**20, r["downtime_us"] / 1000, r["total_us"] / 1000), file=sys.stderr)
print(r["destination_vm"])' "$snap/migration.json")
[ "$dest" = "$id" ] || { echo "   the VM came to h2 as $dest, not $id" >&2; exit 1; }
echo "   on h2 under its own id $dest"
on_h2=(--host h2 --cluster "$cluster" --cluster-dir "$cdir")
sleep 0.5
$forkd vm migrate "$dest" "${on_h2[@]}" --to h1 --mode postcopy --wait --json > "$snap/migration-back.json"
home=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["report"]
p = r["postcopy"]
print("   back to h1 by post-copy: downtime %.1f ms; %d pages fetched after resuming (%d on demand, %d prefetched), window %.0f ms" % (
    r["downtime_us"] / 1000, p["pages_needed"], p["pages_faulted"], p["pages_prefetched"], p["window_us"] / 1000), file=sys.stderr)
print(r["destination_vm"])' "$snap/migration-back.json")
for _ in $(seq 1000); do
    $forkd vm get "$home" "${on_h1[@]}" --json | grep -q '"state":"exited"' && break
    sleep 0.02
done
got=$($forkd vm get "$home" "${on_h1[@]}" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["last_line"])')
want=$(timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities \
    -m 512 -nographic -no-reboot -device isa-debug-exit,iobase=0xf4 -kernel "$elf" \
    -append "$mig" | grep 'zone: done' | tr -d '\r' || true)
if [ -n "$want" ] && [ "$got" = "$want" ]; then echo "   MATCH  [h1] $got (QEMU straight-line, never migrated)"
else echo "   MISMATCH [h1] forkd '$got' QEMU '$want'" >&2; exit 1; fi
echo "== 9. a clone migrates: a zone on h1 forks 2 clones onto h2; clone 1 moves h2 → h3 while it runs"
cz="ticks=800 seed=44 state_mib=16 dirty_pages=8 tick_us=5000"
id=$($forkd vm create "${on_h1[@]}" --mem 512 --cmdline "$cz" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 200); do
    $forkd vm console "$id" "${on_h1[@]}" | grep -q 'zone: start' && break
    sleep 0.01
done
$forkd vm fork "$id" "${on_h1[@]}" --clones 2 --place h2=2 --json > "$snap/cfamily.json"
clone=""
for _ in $(seq 300); do
    clone=$($forkd vm list --host h2 --cluster "$cluster" --cluster-dir "$cdir" --json | python3 -c '
import json, sys
v = [v for v in json.load(sys.stdin)["vms"] if v.get("clone_id") == 1 and v["state"] == "running"]
print(v[0]["id"] if v else "")')
    [ -n "$clone" ] && break
    sleep 0.02
done
[ -n "$clone" ] || { echo "   clone 1 did not start on h2" >&2; exit 1; }
sleep 0.5
$forkd vm migrate "$clone" "${on_h2[@]}" --to h3 --wait --json > "$snap/cmigration.json"
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["report"]
print("   clone 1 (%s) moved to h3: %.1f MiB sent (what h2 had; the rest still comes from h1), downtime %.1f ms"
      % (r["destination_vm"], r["bytes_sent"] / 2**20, r["downtime_us"] / 1000))' "$snap/cmigration.json"
for _ in $(seq 1000); do
    $forkd vm get "$id" "${on_h1[@]}" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if v["state"] == "exited" and all(f["running"] == 0 for f in v["families"]) else 1)' && break
    sleep 0.02
done
tick=$($forkd vm console "$id" "${on_h1[@]}" | sed -n 's/^zone: forked by the host before tick \([0-9]*\): clone=0$/\1/p')
for i in 0 1 2; do
    want=$(timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities \
        -m 512 -nographic -no-reboot -device isa-debug-exit,iobase=0xf4 -kernel "$elf" \
        -append "$cz fork_at=$tick clones=2 as_clone=$i" | grep 'zone: done' | tr -d '\r' || true)
    info=$($forkd vm get "$id" "${on_h1[@]}" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
i = int(sys.argv[1])
if i == 0:
    print("h1"); print(v["last_line"])
else:
    c = [c for c in v["families"][0]["clones"] if c["clone_id"] == i][0]
    print(c.get("host") or "h1"); print(c.get("last_line"))' "$i")
    where=$(head -1 <<<"$info")
    got=$(tail -n +2 <<<"$info")
    if [ -n "$want" ] && [ "$got" = "$want" ]; then echo "   MATCH  [$where] $got"
    else echo "   MISMATCH [$where] forkd '$got' QEMU '$want'" >&2; exit 1; fi
done
$forkd cluster down --name "$cluster" --dir "$cdir"
echo "== 10. the policy engine: a 2-host cluster with its state in etcd and a leader-elected controller;"
echo "   two busy zones on h1, none on h2: h1 runs above 1.2 × the cluster average; the leader migrates one zone to h2"
cluster="demo$((RANDOM % 100000))"
cdir="$snap/policy-cluster"
trap '$forkd cluster down --name "$cluster" --dir "$cdir" >/dev/null 2>&1 || true; rm -rf "$snap"' EXIT
$forkd cluster up --hosts 2 --name "$cluster" --dir "$cdir" --policy --policy-period-ms 500 \
    --cpu-capacity 0.5 --policy-config '{"fork_above": 50, "fork_target": 25, "join_below": 10}'
on_h1=(--host h1 --cluster "$cluster" --cluster-dir "$cdir")
on_h2=(--host h2 --cluster "$cluster" --cluster-dir "$cdir")
busy=()
for seed in 1 2; do   # 2 ms of work every 8 ms tick, 12 s of guest time
    z="ticks=1500 seed=$seed state_mib=8 tick_us=8000"
    busy+=("$z")
    $forkd vm create "${on_h1[@]}" --mem 128 --cmdline "$z" --json \
        | python3 -c 'import json, sys; print("   %s on h1: %s" % (json.load(sys.stdin)["id"], sys.argv[1]))' "$z"
done
# QEMU runs both straight-line meanwhile (12 s each, at once).
for i in 0 1; do
    timeout 120 qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities \
        -m 128 -nographic -no-reboot -device isa-debug-exit,iobase=0xf4 -kernel "$elf" \
        -append "${busy[$i]}" > "$snap/policy-qemu-$i.log" 2>&1 &
done
decision=""
for _ in $(seq 100); do   # at most ~10 s
    decision=$(curl -s --unix-socket "$cdir/h1/api.sock" localhost/v1/policy/decisions | python3 -c '
import json, sys
m = [d for d in json.load(sys.stdin) if d["decision"]["action"] == "migrate" and d.get("outcome") == "done"]
if m:
    d = m[0]
    print(d["decision"]["zone"])
    print("   leader %s: %s" % (d["by"], d["decision"]["reason"]), file=sys.stderr)')
    [ -n "$decision" ] && break
    sleep 0.1
done
[ -n "$decision" ] || { echo "   no migration decided within 10 s" >&2; exit 1; }
for _ in $(seq 1000); do   # both zones end (at most ~20 s)
    n=0
    for h in h1 h2; do
        n=$((n + $($forkd vm list --host $h --cluster "$cluster" --cluster-dir "$cdir" --json | python3 -c '
import json, sys
print(sum(1 for v in json.load(sys.stdin)["vms"] if v["state"] == "running"))')))
    done
    [ "$n" = 0 ] && break
    sleep 0.02
done
wait
for h in h1 h2; do
    $forkd vm list --host $h --cluster "$cluster" --cluster-dir "$cdir" --json | python3 -c '
import json, sys
for v in json.load(sys.stdin)["vms"]:
    if v["state"] != "migrated":
        print(sys.argv[1], v["id"], v.get("last_line") or "")' "$h"
done > "$snap/policy-ends.txt"
python3 - "$decision" "$snap"/policy-ends.txt "$snap"/policy-qemu-0.log "$snap"/policy-qemu-1.log <<'PY'
import sys
moved, ends, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
vms = [l.rstrip("\n").split(" ", 2) for l in open(ends) if l.count(" ") >= 2]
for log in logs:
    want = next((l.strip() for l in open(log, errors="replace") if "zone: done" in l), "")
    got = [(h, i) for h, i, last in vms if want and last == want]
    if not got:
        sys.exit("   MISMATCH: no zone ended with QEMU's line %r; the zones ended with %r" % (want, vms))
    h, i = got[0]
    print("   MATCH  [%s] %s%s %s" % (h, i, " (migrated by the policy)" if i == moved else "", want))
PY
$forkd cluster down --name "$cluster" --dir "$cdir"
echo "== done"
