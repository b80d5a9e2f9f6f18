//! Page server and client over real UDP on 127.0.0.1.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memserver::client::{ClientError, ClientOptions, PageClient};
use memserver::server::{MemServer, ServerLimits};
use memserver::wire::{Body, ErrorCode, Frame, MAX_DATAGRAM};
use memserver::{FamilyKey, PageSource, SourceError, PAGE_SIZE};

/// Pages with distinct contents: page `i` of family label `f` starts with
/// `i` and `f`, then a pattern depending on both. (Labels name the test's
/// families; their wire ids are random.)
struct VecSource {
    pages: Vec<[u8; PAGE_SIZE]>,
    delay: Duration,
}

fn expected(family: u64, i: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (j, b) in p.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ family.wrapping_mul(131)).wrapping_add(j as u64 * 7) as u8;
    }
    p[0..8].copy_from_slice(&i.to_le_bytes());
    p[8..16].copy_from_slice(&family.to_le_bytes());
    p
}

impl VecSource {
    fn new(family: u64, n: u64) -> Arc<VecSource> {
        Arc::new(VecSource {
            pages: (0..n).map(|i| expected(family, i)).collect(),
            delay: Duration::ZERO,
        })
    }
}

impl PageSource for VecSource {
    fn pages(&self) -> u64 {
        self.pages.len() as u64
    }
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let p = self
            .pages
            .get(index as usize)
            .ok_or(SourceError::OutOfRange {
                index,
                pages: self.pages(),
            })?;
        buf.copy_from_slice(p);
        Ok(())
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A server serving families `(label, pages)`, and their keys in order.
fn server_with(families: &[(u64, u64)]) -> (MemServer, Vec<FamilyKey>) {
    let s = MemServer::bind(localhost(), ServerLimits::default()).expect("bind server");
    let keys = families
        .iter()
        .map(|&(f, n)| s.add_family(VecSource::new(f, n)).expect("add family"))
        .collect();
    (s, keys)
}

/// Reads `first .. first + count` and checks every page arrives exactly
/// once, byte-exact.
fn check_range(c: &PageClient, family: u64, first: u64, count: u64) {
    let mut seen: HashMap<u64, u32> = HashMap::new();
    c.read_pages(first, count, &mut |i, data| {
        assert!(
            data[..] == expected(family, i)[..],
            "family {family} page {i} differs"
        );
        *seen.entry(i).or_default() += 1;
    })
    .expect("read_pages");
    assert_eq!(seen.len() as u64, count);
    assert!(seen
        .iter()
        .all(|(i, &n)| n == 1 && (first..first + count).contains(i)));
}

#[test]
fn single_pages_and_ranges_are_exact() {
    let (s, keys) = server_with(&[(1, 300)]);
    let c =
        PageClient::new(s.local_addr(), keys[0].clone(), ClientOptions::default()).expect("client");
    assert_eq!(c.pages(), 300);
    assert_eq!(c.window(), 64);
    let mut buf = [0u8; PAGE_SIZE];
    for i in [0, 1, 63, 64, 150, 299] {
        c.read_page(i, &mut buf).expect("read_page");
        assert!(buf[..] == expected(1, i)[..], "page {i}");
    }
    check_range(&c, 1, 0, 300);
    check_range(&c, 1, 17, 100);
    check_range(&c, 1, 299, 1);
    c.read_pages(5, 0, &mut |_, _| panic!("no pages"))
        .expect("empty range");
    let cs = c.stats();
    assert_eq!(cs.pages_received, 6 + 300 + 100 + 1);
    // The server counts a page after its send returns, which may be just
    // after the client has it: wait (bounded) for the counter to catch up.
    let t = std::time::Instant::now();
    let mut ss = s.stats();
    while ss.pages_sent < cs.pages_received && t.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(1));
        ss = s.stats();
    }
    assert!(ss.pages_sent >= cs.pages_received, "{ss:?}");
    assert!(ss.bytes_sent >= ss.pages_sent * (PAGE_SIZE as u64));
    assert_eq!(ss.families.len(), 1);
    assert_eq!(ss.families[0].family, keys[0].id());
    assert_eq!(ss.families[0].pages_sent, ss.pages_sent);
    assert_eq!(ss.families[0].clients, 1);
    assert_eq!(cs.forged_dropped, 0);
}

/// A key the server does not know gets no answer at all (the client times
/// out); a removed family's clients are told at once, authenticated.
#[test]
fn unknown_key_is_silent_removed_family_and_out_of_range_are_typed_and_quick() {
    let (s, keys) = server_with(&[(1, 10)]);
    let quick = ClientOptions {
        timeout: Duration::from_millis(20),
        retries: 2,
        ..ClientOptions::default()
    };
    let stranger = FamilyKey::generate().expect("key");
    match PageClient::new(s.local_addr(), stranger.clone(), quick) {
        Err(ClientError::Source(SourceError::NoAnswer {
            family, tries: 3, ..
        })) => {
            assert_eq!(family, stranger.id())
        }
        other => panic!("expected NoAnswer, got {other:?}"),
    }
    assert_eq!(s.stats().dropped_unknown_family, 3);
    let t = Instant::now();
    let c =
        PageClient::new(s.local_addr(), keys[0].clone(), ClientOptions::default()).expect("client");
    let mut buf = [0u8; PAGE_SIZE];
    // Caught locally from the image size.
    assert_eq!(
        c.read_page(10, &mut buf),
        Err(SourceError::OutOfRange {
            index: 10,
            pages: 10
        })
    );
    assert!(matches!(
        c.read_pages(8, 5, &mut |_, _| {}),
        Err(SourceError::OutOfRange { index: 10, .. })
    ));
    // Answered by the server: the family shrank behind the client's back.
    let small = s.add_family(VecSource::new(1, 4)).expect("add");
    let c4 = PageClient::with_pages(s.local_addr(), small, 10, ClientOptions::default())
        .expect("client");
    assert_eq!(
        c4.read_page(7, &mut buf),
        Err(SourceError::OutOfRange { index: 7, pages: 4 })
    );
    assert!(s.remove_family(keys[0].id()));
    assert_eq!(
        c.read_page(0, &mut buf),
        Err(SourceError::UnknownFamily(keys[0].id()))
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let ss = s.stats();
    assert_eq!(ss.family_gone, 1);
    assert_eq!(ss.out_of_range, 1);
}

#[test]
fn malformed_and_foreign_datagrams_are_ignored_and_counted() {
    let (s, keys) = server_with(&[(1, 8)]);
    let (key, id) = (&keys[0], keys[0].id());
    let raw = UdpSocket::bind(localhost()).expect("raw");
    let req = Frame::new(
        id,
        1,
        5,
        Body::PageRequest {
            first_page: 0,
            count: 1,
        },
    )
    .encode(key);
    let mut bad_version = req.clone();
    bad_version[4] = 9;
    let mut bad_kind = req.clone();
    bad_kind[5] = 200;
    let reply = Frame::new(
        id,
        1,
        6,
        Body::ErrorReply {
            code: ErrorCode::Internal,
            page: 0,
            detail: 0,
        },
    )
    .encode(key);
    let zero_count = Frame::new(
        id,
        1,
        7,
        Body::PageRequest {
            first_page: 0,
            count: 0,
        },
    )
    .encode(key);
    let bad: Vec<Vec<u8>> = vec![
        vec![],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        req[..10].to_vec(),
        req[..31].to_vec(),
        [&req[..], &[0u8]].concat(),
        vec![0xAB; 5000],
        bad_version,
        bad_kind,
        reply,
        zero_count,
    ];
    for d in &bad {
        raw.send_to(d, s.local_addr()).expect("send junk");
    }
    let c = PageClient::new(s.local_addr(), key.clone(), ClientOptions::default()).expect("client");
    check_range(&c, 1, 0, 8);
    // Junk got no answer.
    raw.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; MAX_DATAGRAM];
    assert!(raw.recv(&mut buf).is_err(), "junk was answered");
    assert_eq!(s.stats().malformed, bad.len() as u64);
}

#[test]
fn raw_info_and_too_large_requests() {
    let s = MemServer::bind(localhost(), ServerLimits::default()).expect("bind");
    let key = s.add_family(VecSource::new(9, 3)).expect("add");
    let c = UdpSocket::bind(localhost()).expect("client");
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let req = Frame::new(key.id(), 5, 77, Body::InfoRequest).encode(&key);
    c.send_to(&req, s.local_addr()).expect("send");
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = c.recv(&mut buf).expect("reply");
    assert!(n <= req.len(), "info reply larger than its request");
    let f = Frame::open(&buf[..n], &key).expect("authentic reply");
    assert_eq!((f.client, f.seq), (5, 77));
    assert_eq!(
        f.body,
        Body::InfoReply {
            pages: 3,
            max_window: 64
        }
    );
    let req = Frame::new(
        key.id(),
        5,
        78,
        Body::PageRequest {
            first_page: 0,
            count: 65,
        },
    )
    .encode(&key);
    c.send_to(&req, s.local_addr()).expect("send");
    let n = c.recv(&mut buf).expect("reply");
    assert!(n <= req.len(), "error reply larger than its request");
    let f = Frame::open(&buf[..n], &key).expect("authentic reply");
    assert!(matches!(
        f.body,
        Body::ErrorReply {
            code: ErrorCode::TooLarge,
            detail: 64,
            ..
        }
    ));
    assert_eq!(s.stats().too_large, 1);
}

#[test]
fn overloaded_server_refuses_then_serves() {
    let limits = ServerLimits {
        workers: 1,
        max_inflight: 1,
        ..ServerLimits::default()
    };
    let s = MemServer::bind(localhost(), limits).expect("bind");
    let src = Arc::new(VecSource {
        pages: (0..4).map(|i| expected(2, i)).collect(),
        delay: Duration::from_millis(100),
    });
    let key = s.add_family(src).expect("add");
    let raw = UdpSocket::bind(localhost()).expect("raw");
    raw.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    // At most one request is served and one queued; the third is refused.
    for seq in 1..=3 {
        let body = Body::PageRequest {
            first_page: seq - 1,
            count: 1,
        };
        let req = Frame::new(key.id(), 1, seq, body).encode(&key);
        raw.send_to(&req, s.local_addr()).expect("send");
    }
    let mut buf = [0u8; MAX_DATAGRAM];
    let (mut pages, mut refused) = (0, 0);
    while pages + refused < 3 {
        let n = raw.recv(&mut buf).expect("reply");
        match Frame::open(&buf[..n], &key).expect("authentic").body {
            Body::PageReply { .. } => pages += 1,
            Body::ErrorReply {
                code: ErrorCode::Overloaded,
                ..
            } => refused += 1,
            b => panic!("unexpected {b:?}"),
        }
    }
    assert!(refused >= 1 && s.stats().overloaded >= 1);
    // A client on the slow server still gets everything by asking again.
    let opts = ClientOptions {
        max_window: 2,
        timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let c = PageClient::new(s.local_addr(), key, opts).expect("client");
    check_range(&c, 2, 0, 4);
}

#[test]
fn server_gone_gives_unavailable_in_bounded_time() {
    let (s, keys) = server_with(&[(1, 8)]);
    let c =
        PageClient::new(s.local_addr(), keys[0].clone(), ClientOptions::default()).expect("client");
    drop(s);
    let t = Instant::now();
    let mut buf = [0u8; PAGE_SIZE];
    let err = c.read_page(3, &mut buf).expect_err("server is gone");
    let el = t.elapsed();
    eprintln!("server gone: gave up after {el:?}: {err}");
    // Its port is closed (ICMP port unreachable): 4 tries, well under 2 s.
    assert!(el < Duration::from_secs(2), "{el:?}");
    match err {
        SourceError::NoAnswer {
            family,
            page: 3,
            tries: 4,
            refused: true,
            ..
        } => assert_eq!(family, keys[0].id()),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn silent_server_gives_unavailable_in_bounded_time() {
    let (s, keys) = server_with(&[(1, 8)]);
    let proxy = LossyProxy::start(s.local_addr(), 0);
    let c = PageClient::new(proxy.addr, keys[0].clone(), ClientOptions::default()).expect("client");
    proxy.drop_percent.store(100, Ordering::Relaxed);
    let t = Instant::now();
    let err = c.read_pages(0, 8, &mut |_, _| {}).expect_err("blackholed");
    let el = t.elapsed();
    // Backing off from 50 ms to 400 ms: about 8 s for 20 re-requests.
    assert!(
        el > Duration::from_secs(5) && el < Duration::from_secs(12),
        "{el:?}"
    );
    assert!(matches!(err, SourceError::NoAnswer { .. }), "{err}");
    assert_eq!(c.stats().retries, 20);
}

#[test]
fn lossy_path_still_delivers_every_page() {
    let (s, keys) = server_with(&[(4, 512)]);
    let proxy = LossyProxy::start(s.local_addr(), 20);
    let c = PageClient::new(proxy.addr, keys[0].clone(), ClientOptions::default()).expect("client");
    check_range(&c, 4, 0, 512);
    let mut buf = [0u8; PAGE_SIZE];
    for i in (0..512).step_by(37) {
        c.read_page(i, &mut buf).expect("read_page");
        assert!(buf[..] == expected(4, i)[..]);
    }
    let cs = c.stats();
    let dropped = proxy.dropped.load(Ordering::Relaxed);
    eprintln!("lossy: proxy dropped {dropped}, client {cs:?}");
    assert!(dropped > 50, "proxy dropped only {dropped}");
    assert!(cs.retries > 0);
    // Re-requests are new datagrams with fresh numbers: none is a replay.
    let ss = s.stats();
    assert_eq!((ss.dropped_replay, ss.dropped_bad_mac), (0, 0), "{ss:?}");
    assert_eq!(cs.forged_dropped, 0);
}

#[test]
fn two_families_on_one_server() {
    let (s, keys) = server_with(&[(10, 100), (20, 50)]);
    let a = PageClient::new(s.local_addr(), keys[0].clone(), ClientOptions::default()).expect("a");
    let b = PageClient::new(s.local_addr(), keys[1].clone(), ClientOptions::default()).expect("b");
    assert_eq!((a.pages(), b.pages()), (100, 50));
    std::thread::scope(|sc| {
        sc.spawn(|| check_range(&a, 10, 0, 100));
        sc.spawn(|| check_range(&b, 20, 0, 50));
    });
    let fams = s.stats().families;
    assert_eq!(fams.len(), 2);
    let of = |k: &FamilyKey| fams.iter().find(|f| f.family == k.id()).expect("served");
    assert!(of(&keys[0]).pages_sent >= 100);
    assert!(of(&keys[1]).pages_sent >= 50);
    // A client of one family cannot read the other: its key is not theirs.
    let wrong = FamilyKey::from_parts(keys[1].id(), *keys[0].secret());
    let quick = ClientOptions {
        timeout: Duration::from_millis(20),
        retries: 1,
        ..ClientOptions::default()
    };
    assert!(PageClient::new(s.local_addr(), wrong, quick).is_err());
    assert_eq!(s.stats().dropped_bad_mac, 2);
}

#[test]
fn loopback_throughput() {
    let n = 8192;
    let (s, keys) = server_with(&[(1, n)]);
    let c =
        PageClient::new(s.local_addr(), keys[0].clone(), ClientOptions::default()).expect("client");
    let want: Vec<[u8; PAGE_SIZE]> = (0..n).map(|i| expected(1, i)).collect();
    let t = Instant::now();
    let mut seen = vec![false; n as usize];
    c.read_pages(0, n, &mut |i, d| {
        assert!(d[..] == want[i as usize][..], "page {i} differs");
        assert!(
            !std::mem::replace(&mut seen[i as usize], true),
            "page {i} twice"
        );
    })
    .expect("read");
    let el = t.elapsed();
    assert!(seen.iter().all(|&s| s), "pages missing");
    let t1 = Instant::now();
    let mut buf = [0u8; PAGE_SIZE];
    for i in 0..1000 {
        c.read_page(i, &mut buf).expect("read_page");
        assert!(buf[..] == expected(1, i)[..], "page {i} differs");
    }
    let single = t1.elapsed() / 1000;
    eprintln!(
        "loopback: {n} pages in 64-page windows: {el:?} ({:.0} pages/s, {:.0} MB/s); \
         single-page round trip {single:?}; client {:?}",
        n as f64 / el.as_secs_f64(),
        (n as f64 * PAGE_SIZE as f64) / el.as_secs_f64() / 1e6,
        c.stats()
    );
}

/// A UDP forwarder between one client and a server that drops a share of
/// the datagrams in each direction (deterministic pseudo-random).
struct LossyProxy {
    addr: SocketAddr,
    drop_percent: Arc<AtomicU32>,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LossyProxy {
    fn start(server: SocketAddr, drop_percent: u32) -> LossyProxy {
        let front = UdpSocket::bind(localhost()).expect("front");
        let back = UdpSocket::bind(localhost()).expect("back");
        back.connect(server).expect("connect");
        let tick = Some(Duration::from_millis(20));
        front.set_read_timeout(tick).expect("timeout");
        back.set_read_timeout(tick).expect("timeout");
        let addr = front.local_addr().expect("addr");
        let (front, back) = (Arc::new(front), Arc::new(back));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let pct = Arc::new(AtomicU32::new(drop_percent));
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for upstream in [true, false] {
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            let (pct, dropped, stop) = (pct.clone(), dropped.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut x: u64 = if upstream {
                    0x1234_5678_9abc
                } else {
                    0xfeed_beef
                };
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let got = if upstream {
                        front.recv_from(&mut buf).map(|(n, from)| {
                            *client.lock().expect("lock") = Some(from);
                            n
                        })
                    } else {
                        back.recv(&mut buf)
                    };
                    let Ok(n) = got else { continue };
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if (x % 100) < u64::from(pct.load(Ordering::Relaxed)) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if upstream {
                        let _ = back.send(&buf[..n]);
                    } else if let Some(to) = *client.lock().expect("lock") {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            }));
        }
        LossyProxy {
            addr,
            drop_percent: pct,
            dropped,
            stop,
            threads,
        }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn client_with_known_size_skips_the_info_round_trip() {
    let (server, keys) = server_with(&[(7, 200)]);
    let c = PageClient::with_pages(
        server.local_addr(),
        keys[0].clone(),
        200,
        ClientOptions::default(),
    )
    .expect("client");
    assert_eq!(c.pages(), 200);
    assert_eq!(
        c.stats().requests_sent,
        0,
        "no request before the first read"
    );
    check_range(&c, 7, 10, 40);
    // A removed family is only noticed at the first read, and typed.
    let gone = server.add_family(VecSource::new(8, 200)).expect("add");
    let bad = PageClient::with_pages(
        server.local_addr(),
        gone.clone(),
        200,
        ClientOptions::default(),
    )
    .expect("client");
    assert!(server.remove_family(gone.id()));
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(
        bad.read_page(0, &mut buf),
        Err(SourceError::UnknownFamily(gone.id()))
    );
}
