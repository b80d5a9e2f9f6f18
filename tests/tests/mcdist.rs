//! Fork with multicast distribution (mcdist) on real KVM: `forkd run
//! --distribution multicast` inside a fresh network namespace (`unshare
//! --net`, `lo` up with MULTICAST and a 224.0.0.0/4 route; the machine's
//! namespace is never touched). Every clone I ends with QEMU's `as_clone=I`
//! line, the parent with `as_clone=0`, and the memory server sends far less
//! for 4 clones than 4× one clone's need. Needs root (namespaces) and
//! /dev/kvm.

use std::process::Command;
use std::time::Duration;
use tests::{forkd_bin, qemu_done_line, require_kvm, run_with_timeout, stdout_lines};

const MEM: u64 = 512;
const BASE: &str = "ticks=12 seed=32 state_mib=16 alloc_mib=2 dirty_pages=20 fork_at=2";

fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        uid, "0",
        "this test makes a network namespace (unshare --net) and needs root; uid is {uid}"
    );
}

struct Run {
    parent: String,
    clones: Vec<(u64, String)>,
    fork: serde_json::Value,
}

/// `forkd run` in a private namespace with multicast on `lo`.
fn run_in_netns(cmdline: &str, distribution: &str) -> Run {
    require_kvm();
    require_root();
    let script = format!(
        "ip link set lo up multicast on && ip route add 224.0.0.0/4 dev lo && \
         exec '{}' run --cmdline '{cmdline}' --json --timeout-s 120 --distribution {distribution} --local-pages network",
        forkd_bin().display()
    );
    let out = run_with_timeout(
        Command::new("unshare").args(["--net", "--", "sh", "-c", &script]),
        Duration::from_secs(180),
    );
    assert!(
        out.status.success(),
        "forkd run ({distribution}) failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout_lines(&out);
    let parent = lines
        .iter()
        .find(|l| l.starts_with("zone: done clone=0"))
        .unwrap_or_else(|| panic!("no parent done line in {lines:?}"))
        .clone();
    let mut clones: Vec<(u64, String)> = lines
        .iter()
        .filter_map(|l| {
            let (id, line) = l.strip_prefix("[clone-")?.split_once("] ")?;
            line.starts_with("zone: done")
                .then(|| Some((id.parse().ok()?, line.to_string())))?
        })
        .collect();
    clones.sort();
    let summary: serde_json::Value =
        serde_json::from_str(lines.last().expect("summary")).expect("JSON summary");
    Run {
        parent,
        clones,
        fork: summary["fork"].clone(),
    }
}

fn bytes(r: &Run) -> u64 {
    r.fork["memserver_bytes_sent"].as_u64().expect("bytes sent")
}

fn done_ms(r: &Run) -> f64 {
    r.fork["clone_done_ms_max"].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn four_clones_by_multicast_match_qemu_and_cost_little() {
    let cmdline = format!("{BASE} clones=4");
    let four = run_in_netns(&cmdline, "multicast");
    assert_eq!(four.fork["distribution"], "multicast");
    assert_eq!(
        four.parent,
        qemu_done_line(&format!("{cmdline} as_clone=0"), MEM),
        "parent"
    );
    assert_eq!(four.clones.len(), 4, "clone lines: {:?}", four.clones);
    for (id, line) in &four.clones {
        assert_eq!(
            line,
            &qemu_done_line(&format!("{cmdline} as_clone={id}"), MEM),
            "clone {id}"
        );
    }
    let host = &four.fork["host_receiver"];
    assert_eq!(host["timeouts"], 0, "{host}");
    for k in ["forged", "foreign", "bad_blocks"] {
        assert_eq!(host[k], 0, "{k}: {host}");
    }
    // A genuine frame can reach the receiver twice (group and end-game
    // unicast) or late, behind a deep socket backlog: it is dropped as a
    // replay, harmlessly. Many would mean the window is too small.
    let (replayed, arrived) = (
        host["replayed"].as_u64().unwrap_or(u64::MAX),
        host["pages_arrived"].as_u64().unwrap_or(0),
    );
    assert!(replayed <= arrived / 20, "replayed: {host}");
    let one = run_in_netns(&format!("{BASE} clones=1"), "multicast");
    assert_eq!(one.clones.len(), 1);
    let unicast = run_in_netns(&cmdline, "unicast");
    let (b1, b4, u4) = (bytes(&one), bytes(&four), bytes(&unicast));
    println!(
        "FIGURES memserver bytes sent: multicast 1 clone {b1}, 4 clones {b4} ({:.2}x); \
         unicast 4 clones {u4} ({:.2}x of multicast's one clone); slowest clone done: \
         multicast {:.0} ms (1 clone {:.0} ms), unicast {:.0} ms",
        b4 as f64 / b1 as f64,
        u4 as f64 / b1 as f64,
        done_ms(&four),
        done_ms(&one),
        done_ms(&unicast),
    );
    println!(
        "multicast: {}\nhost receiver: {host}",
        four.fork["memserver_multicast"]
    );
    assert!(
        (b4 as f64) < 2.0 * b1 as f64,
        "4 clones cost {b4} bytes, one {b1}: multicast should keep it well under 4x"
    );
}
