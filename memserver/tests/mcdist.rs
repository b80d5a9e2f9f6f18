//! mcdist over real multicast, each test in its own network namespace (the
//! test binary re-runs itself under `unshare --net`, brings `lo` up with
//! MULTICAST and a 224.0.0.0/4 route there; the machine's namespace is
//! never touched): host receivers get byte-exact pages, the server's egress
//! for 4 hosts is about one host's need (unicast: 4×), loss is repaired,
//! push fills the hosts, and forged, replayed and foreign frames are
//! rejected, counted and never installed.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memserver::client::{ClientOptions, PageClient};
use memserver::mcdist::host::{HostConfig, HostReceiver, PageFn, SEALED_CACHE_PAGES};
use memserver::mcdist::{session, McEndpoint};
use memserver::server::MemServer;
use memserver::{FamilyKey, PageSource, SourceError, PAGE_SIZE};
use multicast::frame::{self, Fragment, Header, Kind, Request};
use multicast::LossInjection;

const CHILD_VAR: &str = "MEMSERVER_MCDIST_NETNS";

/// Runs `body` in a fresh network namespace (see the module docs).
fn in_netns(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_VAR).ok().as_deref() == Some(name) {
        let dev = std::fs::read_to_string("/proc/self/net/dev").expect("/proc/self/net/dev");
        let ifaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(str::trim))
            .collect();
        assert_eq!(
            ifaces,
            ["lo"],
            "not a private namespace; refusing to configure"
        );
        for args in [
            &["link", "set", "lo", "up", "multicast", "on"][..],
            &["route", "add", "224.0.0.0/4", "dev", "lo"][..],
        ] {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        body();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `unshare --net` (root needed): {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    let _ = out.read_to_string(&mut stdout);
    let status = child.wait().expect("wait");
    let stderr = t_err.join().unwrap_or_default();
    assert!(
        status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} in its namespace failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    println!("{stdout}");
}

fn expected(i: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (j, b) in p.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> (j % 24)).wrapping_add(j as u64 * 13) as u8;
    }
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

struct Pattern(u64);

impl PageSource for Pattern {
    fn pages(&self) -> u64 {
        self.0
    }
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        if index >= self.0 {
            return Err(SourceError::OutOfRange {
                index,
                pages: self.0,
            });
        }
        *buf = expected(index);
        Ok(())
    }
}

const PAGES: u64 = 1024;
const RUN: u64 = 32;

fn host_cfg() -> HostConfig {
    HostConfig::on(Ipv4Addr::LOCALHOST)
}

/// Reads every page in runs of `RUN` (like faults with read-ahead),
/// checking each byte; returns the pages delivered.
fn read_all(src: &dyn PageSource) -> u64 {
    let mut n = 0;
    for first in (0..PAGES).step_by(RUN as usize) {
        src.read_pages(first, RUN, &mut |i, d| {
            assert!(d == &expected(i), "page {i} corrupted");
            n += 1;
        })
        .unwrap_or_else(|e| panic!("pages {first}..: {e}"));
    }
    n
}

/// A multicast family of `hosts` receivers reading all pages at once:
/// the server's multicast bytes, and the receivers.
fn multicast_run(hosts: usize, loss: f64) -> (u64, Vec<Arc<HostReceiver>>) {
    let server = MemServer::loopback().expect("server");
    let key = FamilyKey::generate().expect("key");
    let ep = server
        .add_family_multicast(key.clone(), Arc::new(Pattern(PAGES)), vec![])
        .expect("family");
    let rs: Vec<Arc<HostReceiver>> = (0..hosts)
        .map(|h| {
            let mut cfg = host_cfg();
            if loss > 0.0 {
                cfg.loss = Some(LossInjection {
                    drop_probability: loss,
                    seed: h as u64 + 1,
                });
            }
            Arc::new(HostReceiver::start(ep, &key, PAGES, cfg).expect("receiver"))
        })
        .collect();
    let threads: Vec<_> = rs
        .iter()
        .map(|r| {
            let r = r.clone();
            std::thread::spawn(move || read_all(&*r))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("reader"), PAGES);
    }
    let st = server.stats();
    assert_eq!(st.bytes_sent, st.multicast.total.bytes_sent, "no unicast");
    println!(
        "{hosts} hosts, loss {loss}: server {:?}",
        st.multicast.total
    );
    (st.multicast.total.bytes_sent, rs)
}

fn unicast_run(clients: usize) -> u64 {
    let server = MemServer::loopback().expect("server");
    let key = FamilyKey::generate().expect("key");
    server
        .add_family_with_key(key.clone(), Arc::new(Pattern(PAGES)))
        .expect("family");
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let c = PageClient::with_pages(
                server.local_addr(),
                key.clone(),
                PAGES,
                ClientOptions::default(),
            )
            .expect("client");
            std::thread::spawn(move || read_all(&c))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("reader"), PAGES);
    }
    server.stats().bytes_sent
}

#[test]
fn four_hosts_cost_about_one() {
    in_netns("four_hosts_cost_about_one", || {
        let (one, _) = multicast_run(1, 0.0);
        let (four, rs) = multicast_run(4, 0.0);
        let (u1, u4) = (unicast_run(1), unicast_run(4));
        let need = PAGES * PAGE_SIZE as u64;
        println!(
            "FIGURES pages={PAGES} need={need} multicast: 1 host {one} B, 4 hosts {four} B \
             ({:.2}x); unicast: 1 client {u1} B, 4 clients {u4} B ({:.2}x)",
            four as f64 / one as f64,
            u4 as f64 / u1 as f64
        );
        assert!(four as f64 <= 1.3 * one as f64, "{four} vs {one}");
        assert!(u4 as f64 >= 3.5 * u1 as f64, "unicast {u4} vs {u1}");
        for r in &rs {
            let s = r.stats();
            // Every page read came from the cache or arrived asked for.
            assert_eq!(s.cache_hits + s.cache_misses, PAGES, "{s:?}");
            assert_eq!(s.timeouts + s.bad_blocks, 0, "{s:?}");
        }
        // Most pages were asked for by another host and found cached.
        let hits: u64 = rs.iter().map(|r| r.stats().cache_hits).sum();
        println!("cache hits over 4 hosts: {hits}");
    });
}

#[test]
fn loss_is_repaired_and_counted() {
    in_netns("loss_is_repaired_and_counted", || {
        let (one, _) = multicast_run(1, 0.0);
        let (lossy, rs) = multicast_run(4, 0.10);
        let rereq: u64 = rs.iter().map(|r| r.stats().receiver.rerequests).sum();
        let dropped: u64 = rs.iter().map(|r| r.stats().receiver.injected_drops).sum();
        println!(
            "FIGURES 10% loss, 4 hosts: {lossy} B ({:.2}x one host without loss), \
             {dropped} frames dropped, {rereq} re-requests",
            lossy as f64 / one as f64
        );
        assert!(dropped > 0 && rereq > 0, "{dropped} {rereq}");
    });
}

#[test]
fn push_fills_hosts_and_subscribers_and_the_cache_is_bounded() {
    in_netns(
        "push_fills_hosts_and_subscribers_and_the_cache_is_bounded",
        || {
            let server = MemServer::loopback().expect("server");
            let key = FamilyKey::generate().expect("key");
            let ranges = vec![(0, 100), (600, 424)];
            let ep = server
                .add_family_multicast(key.clone(), Arc::new(Pattern(PAGES)), ranges)
                .expect("family");
            let cfg = HostConfig {
                cache_pages: 256,
                ..host_cfg()
            };
            let r = HostReceiver::start(ep, &key, PAGES, cfg).expect("receiver");
            let seen = Arc::new(AtomicU64::new(0));
            let s2 = seen.clone();
            let f: Arc<PageFn> = Arc::new(move |i, d| {
                assert!(d == &expected(i), "page {i} corrupted");
                s2.fetch_add(1, Ordering::Relaxed);
            });
            let sub = r.subscribe(f, true).expect("subscribe");
            assert_eq!(server.start_push(key.id()).expect("push"), 524);
            assert_eq!(server.start_push(key.id()).expect("again"), 0);
            let t = Instant::now();
            while r.stats().pages_pushed < 524 && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let s = r.stats();
            println!("push: {s:?}");
            assert_eq!(s.pages_pushed, 524, "{s:?}");
            assert_eq!(seen.load(Ordering::Relaxed), 524);
            assert_eq!(s.cache_misses, 0);
            assert!(s.cached <= 256 && s.evicted >= 524 - 256, "{s:?}");
            // A late page read is a hit; an evicted one is asked for again.
            let mut buf = [0u8; PAGE_SIZE];
            r.read_page(1023, &mut buf).expect("cached");
            r.read_page(0, &mut buf).expect("evicted, asked again");
            assert!(buf == expected(0), "page 0 corrupted");
            let s = r.stats();
            assert_eq!((s.cache_hits, s.cache_misses), (1, 1), "{s:?}");
            drop(sub);
            assert_eq!(r.stats().subscribers, 0);
            // The family ends: the group is freed, the cache dropped.
            assert!(server.remove_family(key.id()));
            r.close();
            assert_eq!(r.stats().cached, 0);
            assert!(matches!(
                r.read_page(5, &mut buf),
                Err(SourceError::Unavailable(_))
            ));
            assert!(server.stats().multicast.families.is_empty());
        },
    );
}

/// Once sealed (every local clone subscribed), the receiver keeps only the
/// newest few pages: pushed pages reach the subscriber, at most
/// `SEALED_CACHE_PAGES` stay cached, and a read still gets its page (asked
/// for, kept until it is taken).
#[test]
fn a_sealed_receiver_keeps_only_what_reads_wait_for() {
    in_netns("a_sealed_receiver_keeps_only_what_reads_wait_for", || {
        let server = MemServer::loopback().expect("server");
        let key = FamilyKey::generate().expect("key");
        let ep = server
            .add_family_multicast(key.clone(), Arc::new(Pattern(PAGES)), vec![(0, 200)])
            .expect("family");
        let r = HostReceiver::start(ep, &key, PAGES, host_cfg()).expect("receiver");
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let f: Arc<PageFn> = Arc::new(move |_, _| {
            s2.fetch_add(1, Ordering::Relaxed);
        });
        let _sub = r.subscribe(f, true).expect("subscribe");
        r.seal();
        server.start_push(key.id()).expect("push");
        let t = Instant::now();
        while r.stats().pages_arrived < 200 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = r.stats();
        assert_eq!(s.pages_arrived, 200, "{s:?}");
        assert!(s.cached <= SEALED_CACHE_PAGES as u64, "{s:?}");
        assert_eq!(seen.load(Ordering::Relaxed), 200);
        let mut buf = [0u8; PAGE_SIZE];
        r.read_page(700, &mut buf).expect("asked for");
        assert!(buf == expected(700), "page 700 corrupted");
        r.read_page(150, &mut buf)
            .expect("a recent arrival, cached");
        assert!(buf == expected(150), "page 150 corrupted");
    });
}

fn data_frames(s: &multicast::Session, origin: u32, seq0: u64, block: u64) -> Vec<Vec<u8>> {
    let bytes = [0xeeu8; PAGE_SIZE];
    let per = frame::max_fragment(frame::DEFAULT_MTU);
    let count = PAGE_SIZE.div_ceil(per);
    (0..count)
        .map(|k| {
            let mut p = Vec::new();
            let off = k * per;
            Fragment {
                block,
                block_len: PAGE_SIZE as u32,
                offset: off as u32,
                index: k as u16,
                count: count as u16,
                bytes: &bytes[off..(off + per).min(PAGE_SIZE)],
            }
            .encode(&mut p);
            let h = Header {
                kind: Kind::Data,
                session: s.id,
                origin,
                seq: seq0 + k as u64,
                flags: 0,
            };
            let mut f = Vec::new();
            frame::encode(&mut f, s, &h, &p);
            f
        })
        .collect()
}

#[test]
fn forged_replayed_and_foreign_frames_are_rejected() {
    in_netns("forged_replayed_and_foreign_frames_are_rejected", || {
        let server = MemServer::loopback().expect("server");
        let key = FamilyKey::generate().expect("key");
        let ep: McEndpoint = server
            .add_family_multicast(key.clone(), Arc::new(Pattern(PAGES)), vec![])
            .expect("family");
        let r = HostReceiver::start(ep, &key, PAGES, host_cfg()).expect("receiver");
        let installed = Arc::new(AtomicU64::new(0));
        let i2 = installed.clone();
        let _sub = r
            .subscribe(
                Arc::new(move |_, _| {
                    i2.fetch_add(1, Ordering::Relaxed);
                }),
                false,
            )
            .expect("subscribe");
        let raw = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("raw");
        let group = SocketAddr::from((ep.group, ep.port));
        // Forged: the family's id, a key guessed wrong.
        let forged = multicast::Session {
            id: session(&key).id,
            key: multicast::SessionKey([7; 32]),
        };
        // Foreign: another family's session.
        let other = FamilyKey::generate().expect("other");
        let mut sent = 0;
        for f in
            data_frames(&forged, 1, 1, 5)
                .into_iter()
                .chain(data_frames(&session(&other), 2, 1, 6))
        {
            raw.send_to(&f, group).expect("send");
            sent += 1;
        }
        // Replayed: an authentic fragment (a test holding the key stands in
        // for a captured frame) sent twice; its block never completes.
        let genuine = data_frames(&session(&key), 3, 1, 7);
        raw.send_to(&genuine[0], group).expect("send");
        raw.send_to(&genuine[0], group).expect("replay");
        // A forged request to the sender: nothing may be sent for it.
        let mut p = Vec::new();
        Request::encode(0, &[1, 2, 3], &mut p);
        let h = Header {
            kind: Kind::Request,
            session: forged.id,
            origin: 4,
            seq: 1,
            flags: 0,
        };
        let mut req = Vec::new();
        frame::encode(&mut req, &forged, &h, &p);
        raw.send_to(&req, ep.server).expect("request");
        std::thread::sleep(Duration::from_millis(300));
        let s = r.stats();
        let st = server.stats().multicast.total;
        println!("receiver {s:?}\nsender {st:?}");
        assert_eq!(s.receiver.forged, 3, "{s:?}");
        assert_eq!(s.receiver.foreign, 3, "{s:?}");
        assert_eq!(s.receiver.replayed, 1, "{s:?}");
        assert_eq!((s.pages_arrived, s.cached, s.subscriber_calls), (0, 0, 0));
        assert_eq!(installed.load(Ordering::Relaxed), 0);
        assert_eq!(st.forged, 1, "{st:?}");
        assert_eq!(st.frames_sent, 0, "{st:?}");
        assert_eq!(sent, 6);
        // The real pages still come, byte-exact (not 7: its authentic
        // fragment is legitimately held for reassembly).
        let mut buf = [0u8; PAGE_SIZE];
        for i in [5, 6] {
            r.read_page(i, &mut buf).expect("page");
            assert!(buf == expected(i), "page {i} corrupted");
        }
    });
}
