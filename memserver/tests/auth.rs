//! Authentication and amplification: forged, replayed, unknown-family and
//! unauthenticated requests from raw sockets on 127.0.0.1 get nothing back
//! and are counted; clients drop forged replies.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use memserver::client::{ClientOptions, PageClient};
use memserver::server::{MemServer, ServerLimits, ServerStats};
use memserver::wire::{Body, Frame, Kind, MAX_DATAGRAM};
use memserver::{FamilyKey, PageSource, SourceError, PAGE_SIZE};

/// How long "nothing comes back" is waited for.
const SILENCE: Duration = Duration::from_millis(300);

struct Pattern(u64);

fn page_of(i: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (j, b) in p.iter_mut().enumerate() {
        *b = (i as usize * 13 + j * 7) as u8;
    }
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

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
        *buf = page_of(index);
        Ok(())
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn setup(pages: u64) -> (MemServer, FamilyKey) {
    let s = MemServer::bind(localhost(), ServerLimits::default()).expect("bind");
    let key = s.add_family(Arc::new(Pattern(pages))).expect("family");
    (s, key)
}

fn raw() -> UdpSocket {
    let r = UdpSocket::bind(localhost()).expect("raw socket");
    r.set_read_timeout(Some(SILENCE)).expect("timeout");
    r
}

/// Nothing arrives on `sock` within [`SILENCE`].
fn assert_silent(sock: &UdpSocket, what: &str) {
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    if let Ok((n, from)) = sock.recv_from(&mut buf) {
        panic!("{what}: got a {n}-byte answer from {from}");
    }
}

fn request(key: &FamilyKey, client: u64, seq: u64, first_page: u64, count: u32) -> Vec<u8> {
    Frame::new(
        key.id(),
        client,
        seq,
        Body::PageRequest { first_page, count },
    )
    .encode(key)
}

/// The counters that say the server sent something, and the drops.
fn sent(s: &ServerStats) -> (u64, u64) {
    (s.bytes_sent, s.pages_sent)
}

#[test]
fn forged_requests_get_nothing_and_are_counted() {
    let (s, key) = setup(16);
    let sock = raw();
    // Right family id, wrong secret.
    let forger = FamilyKey::from_parts(key.id(), [0x5a; 32]);
    sock.send_to(&request(&forger, 1, 1, 0, 64), s.local_addr())
        .expect("send");
    // A valid request with one byte changed (count 4 -> 5).
    let mut tampered = request(&key, 1, 2, 0, 4);
    tampered[40] ^= 1;
    sock.send_to(&tampered, s.local_addr()).expect("send");
    // No tag at all: zeros where the MAC goes.
    let mut untagged = request(&key, 1, 3, 0, 64);
    let len = untagged.len();
    untagged[len - 16..].fill(0);
    sock.send_to(&untagged, s.local_addr()).expect("send");
    assert_silent(&sock, "forged request");
    let st = s.stats();
    assert_eq!(st.dropped_bad_mac, 3, "{st:?}");
    assert_eq!(sent(&st), (0, 0));
    assert_eq!((st.requests, st.families[0].clients), (0, 0));
}

#[test]
fn unknown_family_gets_nothing_and_is_counted() {
    let (s, _key) = setup(16);
    let sock = raw();
    let stranger = FamilyKey::generate().expect("key");
    sock.send_to(&request(&stranger, 1, 1, 0, 64), s.local_addr())
        .expect("send");
    let info = Frame::new(stranger.id(), 1, 2, Body::InfoRequest).encode(&stranger);
    sock.send_to(&info, s.local_addr()).expect("send");
    assert_silent(&sock, "unknown family");
    let st = s.stats();
    assert_eq!(st.dropped_unknown_family, 2, "{st:?}");
    assert_eq!(sent(&st), (0, 0));
}

/// The amplification of the issue: a small unauthenticated request (wire
/// version 1: 32 bytes asking for 64 pages) gets nothing, from the
/// server's own view of an address that never proved anything.
#[test]
fn unauthenticated_old_version_request_gets_nothing() {
    let (s, key) = setup(128);
    let sock = raw();
    let mut v1 = Vec::with_capacity(32);
    v1.extend_from_slice(b"FKPG");
    v1.extend_from_slice(&[1, Kind::PageRequest as u8, 0, 0]);
    v1.extend_from_slice(&key.id().to_le_bytes());
    v1.extend_from_slice(&7u32.to_le_bytes());
    v1.extend_from_slice(&0u64.to_le_bytes());
    v1.extend_from_slice(&64u32.to_le_bytes());
    assert_eq!(v1.len(), 32);
    sock.send_to(&v1, s.local_addr()).expect("send");
    assert_silent(&sock, "v1 request");
    let st = s.stats();
    assert_eq!(st.dropped_unproven, 1, "{st:?}");
    assert_eq!(sent(&st), (0, 0));
}

/// An authenticated request for more than the server serves per request
/// is refused with an answer no larger than the request.
#[test]
fn oversized_request_gets_at_most_its_own_size() {
    let (s, key) = setup(128);
    let sock = raw();
    let req = request(&key, 9, 1, 0, 1000);
    sock.send_to(&req, s.local_addr()).expect("send");
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = sock.recv(&mut buf).expect("a TooLarge answer");
    assert!(
        n <= req.len(),
        "{n}-byte answer to a {}-byte request",
        req.len()
    );
    assert_silent(&sock, "after the one refusal");
    let st = s.stats();
    assert_eq!((st.too_large, st.pages_sent), (1, 0), "{st:?}");
    assert_eq!(st.bytes_sent, n as u64);
}

/// A request captured on its way from a real client to the server, resent
/// later (from the same and from another address), gets nothing.
#[test]
fn replayed_captured_request_gets_nothing_and_is_counted() {
    let (s, key) = setup(16);
    // The client talks to a relay that records what it forwards.
    let relay = UdpSocket::bind(localhost()).expect("relay");
    relay
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let relay_addr = relay.local_addr().expect("addr");
    let opts = ClientOptions {
        timeout: Duration::from_secs(2),
        max_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = PageClient::with_pages(relay_addr, key.clone(), 16, opts).expect("client");
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; PAGE_SIZE];
        client.read_page(5, &mut buf).map(|()| buf)
    });
    let mut buf = [0u8; MAX_DATAGRAM];
    let (n, client_addr) = relay.recv_from(&mut buf).expect("the client's request");
    let captured = buf[..n].to_vec();
    relay.send_to(&captured, s.local_addr()).expect("forward");
    let (n, _) = relay.recv_from(&mut buf).expect("the server's reply");
    relay.send_to(&buf[..n], client_addr).expect("forward back");
    let page = reader.join().expect("reader").expect("page 5");
    assert!(page == page_of(5), "page 5 differs");
    // The worker counts a page after its send returns: wait (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while s.stats().pages_sent == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let before = s.stats();
    assert_eq!(before.pages_sent, 1);

    // Replayed from the relay's address and from a stranger's.
    relay.send_to(&captured, s.local_addr()).expect("replay");
    let other = raw();
    other.send_to(&captured, s.local_addr()).expect("replay");
    relay.set_read_timeout(Some(SILENCE)).expect("timeout");
    assert_silent(&relay, "replay from the relay");
    assert_silent(&other, "replay from another address");
    let st = s.stats();
    assert_eq!(st.dropped_replay, 2, "{st:?}");
    assert_eq!(sent(&st), sent(&before));
}

#[test]
fn replay_window_accepts_reordering_but_not_repeats() {
    let (s, key) = setup(16);
    let sock = raw();
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; MAX_DATAGRAM];
    // Sequence numbers out of order are fine once each.
    for seq in [3, 1, 2] {
        sock.send_to(&request(&key, 4, seq, seq, 1), s.local_addr())
            .expect("send");
        let n = sock.recv(&mut buf).expect("page");
        let f = Frame::open(&buf[..n], &key).expect("authentic");
        assert_eq!((f.client, f.seq), (4, seq));
        assert!(matches!(f.body, Body::PageReply { page, .. } if page == seq));
    }
    sock.set_read_timeout(Some(SILENCE)).expect("timeout");
    sock.send_to(&request(&key, 4, 2, 2, 1), s.local_addr())
        .expect("send");
    assert_silent(&sock, "repeated sequence number");
    assert_eq!(s.stats().dropped_replay, 1);
}

/// After all of the above, a real client still reads byte-exact pages.
#[test]
fn legitimate_client_unaffected_by_attacks() {
    let (s, key) = setup(200);
    let sock = raw();
    let forger = FamilyKey::from_parts(key.id(), [1; 32]);
    for seq in 1..=50 {
        sock.send_to(&request(&forger, 1, seq, 0, 64), s.local_addr())
            .expect("send");
    }
    let c = PageClient::new(s.local_addr(), key, ClientOptions::default()).expect("client");
    let mut got = 0;
    c.read_pages(0, 200, &mut |i, d| {
        assert!(d[..] == page_of(i)[..], "page {i}");
        got += 1;
    })
    .expect("read");
    assert_eq!(got, 200);
    assert_silent(&sock, "forger");
    assert_eq!(s.stats().dropped_bad_mac, 50);
}

/// A client drops a reply that is not tagged under its family's key, and
/// takes the genuine one.
#[test]
fn client_drops_forged_replies() {
    let key = FamilyKey::generate().expect("key");
    let fake = UdpSocket::bind(localhost()).expect("fake server");
    fake.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let opts = ClientOptions {
        timeout: Duration::from_secs(2),
        max_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let addr = fake.local_addr().expect("addr");
    let client = PageClient::with_pages(addr, key.clone(), 4, opts).expect("client");
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; PAGE_SIZE];
        let r = client.read_page(2, &mut buf);
        (r, buf, client.stats())
    });
    let mut buf = [0u8; MAX_DATAGRAM];
    let (n, from) = fake.recv_from(&mut buf).expect("request");
    let req = Frame::open(&buf[..n], &key).expect("an authentic request");
    let forger = FamilyKey::from_parts(key.id(), [9; 32]);
    let evil = [0xee; PAGE_SIZE];
    let good = page_of(2);
    let reply = |k: &FamilyKey, data: &[u8; PAGE_SIZE]| {
        Frame::new(
            key.id(),
            req.client,
            req.seq,
            Body::PageReply { page: 2, data },
        )
        .encode(k)
    };
    fake.send_to(&reply(&forger, &evil), from).expect("forged");
    fake.send_to(&reply(&key, &good), from).expect("genuine");
    let (r, page, stats) = reader.join().expect("reader");
    r.expect("page 2");
    assert!(page == good, "took the forged page");
    assert_eq!(stats.forged_dropped, 1, "{stats:?}");
    assert_eq!(stats.pages_received, 1);
}
