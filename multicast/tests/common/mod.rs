//! Test support: a private network namespace per test, a patterned block
//! source, and waiting helpers.
//!
//! Multicast tests never touch the machine's namespace: each test re-runs
//! its own test binary, filtered to itself, under `unshare --net` (a fresh
//! anonymous namespace that vanishes with the process, whatever happens to
//! it), brings `lo` up there with the MULTICAST flag and a 224.0.0.0/4
//! route, and runs the body. The parent fails loudly if the namespace
//! cannot be made or the child did not run exactly one passing test.

#![allow(dead_code)]

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use multicast::{
    BlockSource, Event, GroupConfig, ReceiverConfig, SenderConfig, Session, SessionId, SessionKey,
};

const CHILD_VAR: &str = "MULTICAST_TEST_NETNS";
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `body` inside a fresh network namespace (see the module docs).
pub fn in_netns(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_VAR).ok().as_deref() == Some(name) {
        setup_namespace();
        body();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `unshare --net` (util-linux, root or CAP_SYS_ADMIN needed): {e}")
        });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the namespaced test") {
            break Some(s);
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    let Some(status) = status else {
        panic!("test {name} in its namespace timed out after {CHILD_TIMEOUT:?}\n{report}");
    };
    assert!(
        status.success() && stdout.contains("test result: ok. 1 passed"),
        "test {name} in its namespace failed ({status})\n{report}"
    );
    println!("{stdout}");
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed in the test namespace: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn setup_namespace() {
    // Refuse to touch interfaces unless this is a fresh namespace
    // (/proc/self/net/dev lists this process's namespace's interfaces).
    let dev = std::fs::read_to_string("/proc/self/net/dev").expect("reading /proc/self/net/dev");
    let ifaces: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect();
    assert_eq!(
        ifaces,
        vec!["lo".to_string()],
        "not in a private network namespace (interfaces {ifaces:?}); refusing to configure"
    );
    ip(&["link", "set", "lo", "up", "multicast", "on"]);
    ip(&["route", "add", "224.0.0.0/4", "dev", "lo"]);
}

/// The test group on `lo`.
pub fn group(port: u16) -> GroupConfig {
    GroupConfig {
        interface: Ipv4Addr::LOCALHOST,
        ..GroupConfig::new(Ipv4Addr::new(239, 77, 0, 1), port)
    }
}

/// A fixed session.
pub fn session(id: u64) -> Session {
    Session {
        id: SessionId(id),
        key: SessionKey([id as u8 ^ 0x5a; 32]),
    }
}

/// The bytes of block `i` of length `len`.
pub fn pattern(i: u64, len: usize) -> Vec<u8> {
    let seed = blake3::hash(&i.to_le_bytes());
    (0..len)
        .map(|j| seed.as_bytes()[j % 32] ^ (j / 32) as u8)
        .collect()
}

/// `count` blocks of `len` bytes each.
pub struct Pattern {
    pub count: u64,
    pub len: usize,
}

impl BlockSource for Pattern {
    fn read_block(&self, index: u64, out: &mut Vec<u8>) -> bool {
        if index >= self.count {
            return false;
        }
        out.extend_from_slice(&pattern(index, self.len));
        true
    }
}

/// A sender config on 127.0.0.1 with an ephemeral request port.
pub fn sender_cfg(session: Session, port: u16) -> SenderConfig {
    SenderConfig::new(
        session,
        group(port),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
    )
}

/// A receiver config talking to `server`.
pub fn receiver_cfg(session: Session, port: u16, server: SocketAddr) -> ReceiverConfig {
    ReceiverConfig {
        bind: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        ..ReceiverConfig::new(session, group(port), server)
    }
}

/// Polls `cond` every 5 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Everything a receiver delivered so far: block index → (bytes, flags).
#[derive(Default)]
pub struct Got {
    pub blocks: std::collections::HashMap<u64, multicast::Block>,
    pub gave_up: Vec<u64>,
    pub deliveries: usize,
}

impl Got {
    /// Takes every pending event, checking each block's bytes.
    pub fn drain(&mut self, rx: &mpsc::Receiver<Event>, len: usize) {
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Block(b) => {
                    assert_eq!(b.data, pattern(b.index, len), "block {} corrupted", b.index);
                    self.deliveries += 1;
                    self.blocks.insert(b.index, b);
                }
                Event::GaveUp(i) => self.gave_up.push(i),
            }
        }
    }

    /// Drains until all of `want` arrived or `limit` passes.
    pub fn wait_for(
        &mut self,
        rx: &mpsc::Receiver<Event>,
        len: usize,
        want: impl IntoIterator<Item = u64> + Clone,
        limit: Duration,
    ) -> bool {
        wait_until(limit, || {
            self.drain(rx, len);
            want.clone()
                .into_iter()
                .all(|i| self.blocks.contains_key(&i))
        })
    }
}
