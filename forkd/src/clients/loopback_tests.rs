//! The ingress and the client library over loopback UDP, without KVM: a
//! fake guest (the zone's own client table, `guest_agent::clients`)
//! consumes a ring in anonymous memory.

use super::ingress::{Access, Directory, Ingress, IngressConfig, Route, Routing, Target};
use super::ring::{GuestView, Ring};
use super::sender::{ClientSender, SenderConfig};
use super::wire::{UpdatesEncoder, WireUpdate};
use crate::vmm::memory::{self, GuestMemory};
use crate::vmm::page_bitmap::VmmWrites;
use guest_agent::abi;
use guest_agent::clients::{ClientTable, Update};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const AGENT: u64 = 0x10_0000;
const RING: u64 = 0x20_0000;
/// A small ring: the producer often waits for room.
const SLOTS: u64 = 16;

struct FakeGuest {
    slots: u64,
    mem: GuestMemory,
    writes: VmmWrites,
    table: Mutex<Vec<u64>>,
    /// (client, seq) in application order.
    applied: Mutex<Vec<(u32, u64)>>,
}

impl FakeGuest {
    fn new(slots: u64) -> Arc<FakeGuest> {
        let mem = memory::anonymous(8 << 20).expect("memory");
        let put = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).expect("write");
        put(AGENT + 8 * abi::AGENT_WORD_INBOX_GPA as u64, RING);
        put(
            AGENT + 8 * abi::AGENT_WORD_INBOX_BYTES as u64,
            abi::INBOX_HEADER_BYTES + slots * abi::INBOX_SLOT_BYTES,
        );
        put(RING, abi::INBOX_MAGIC);
        put(RING + 8, abi::INBOX_VERSION);
        put(RING + 16, slots);
        put(RING + 24, abi::INBOX_SLOT_BYTES);
        Arc::new(FakeGuest {
            slots,
            mem,
            writes: VmmWrites::default(),
            table: Mutex::new(vec![0; guest_agent::clients::TABLE_WORDS]),
            applied: Mutex::new(Vec::new()),
        })
    }

    /// One drain, as the zone guest does it.
    fn drain(&self) {
        let v = GuestView {
            memory: &self.mem,
            writes: &self.writes,
            agent_gpa: AGENT,
        };
        let Ok(ring) = Ring::attach(&v) else { return };
        let producer = ring.producer(&v).unwrap_or(0);
        let mut consumer = ring.word(&v, abi::INBOX_WORD_CONSUMER).unwrap_or(0);
        let mut words = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = ClientTable::resume(&mut words);
        while consumer < producer {
            let slot =
                RING + abi::INBOX_HEADER_BYTES + (consumer % self.slots) * abi::INBOX_SLOT_BYTES;
            let client: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap_or(0);
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap_or(0);
            let seq: u64 = self.mem.read_obj(GuestAddress(slot + 8)).unwrap_or(0);
            let mut payload = vec![0u8; len as usize];
            let _ = self
                .mem
                .read_slice(&mut payload, GuestAddress(slot + abi::SLOT_HEADER_BYTES));
            let u = Update {
                client,
                seq,
                payload: &payload,
            };
            let status = table.apply(&u, 1, 0, 1).slot_status();
            if status == abi::SLOT_APPLIED {
                self.applied
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((client, seq));
            }
            let _ = self
                .mem
                .write_obj(status, GuestAddress(slot + abi::SLOT_OFF_STATUS));
            consumer += 1;
        }
        let _ = self.mem.write_obj(
            consumer,
            GuestAddress(RING + 8 * abi::INBOX_WORD_CONSUMER as u64),
        );
    }
}

struct FakeDir {
    guest: Arc<FakeGuest>,
    moved: Option<SocketAddr>,
}

impl Directory for FakeDir {
    fn routing(&self, vm: u64) -> Routing {
        match (vm, self.moved) {
            (1, _) => Routing::Single(Route::Here(Target::Vm(1))),
            (2, Some(to)) => Routing::Single(Route::Moved(to)),
            _ => Routing::Single(Route::Unknown),
        }
    }
    fn forwarded(&self, _family: u64, _clone_id: u64) -> Option<Target> {
        None
    }
    fn with_guest(&self, _t: Target, f: &mut dyn FnMut(&GuestView)) -> Access {
        f(&GuestView {
            memory: &self.guest.mem,
            writes: &self.guest.writes,
            agent_gpa: AGENT,
        });
        Access::Done
    }
}

fn start(moved: Option<SocketAddr>) -> (Ingress, Arc<FakeGuest>, Arc<AtomicBool>) {
    start_with(moved, SLOTS)
}

fn start_with(moved: Option<SocketAddr>, slots: u64) -> (Ingress, Arc<FakeGuest>, Arc<AtomicBool>) {
    let guest = FakeGuest::new(slots);
    let dir = Arc::new(FakeDir {
        guest: guest.clone(),
        moved,
    });
    let ingress =
        Ingress::start(IngressConfig::new("127.0.0.1:0".parse().unwrap()), dir).expect("ingress");
    let stop = Arc::new(AtomicBool::new(false));
    let (g, s) = (guest.clone(), stop.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Acquire) {
            g.drain();
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    (ingress, guest, stop)
}

fn payload(c: u32, s: u64) -> Vec<u8> {
    guest_agent::reference::payload_for(c, s, 256 + (s as usize % 200))
}

#[test]
fn many_clients_through_a_small_ring_are_applied_once_in_order() {
    let (ingress, guest, stop) = start(None);
    let mut tx = ClientSender::new(SenderConfig::default()).expect("sender");
    tx.set_zone(1, ingress.local_addr());
    for s in 1..=20 {
        for c in 0..10 {
            tx.send(1, c, &payload(c, s)).expect("send");
        }
    }
    assert!(tx.wait_acked(Duration::from_secs(20)).expect("poll"));
    let applied = guest.applied.lock().unwrap().clone();
    assert_eq!(applied.len(), 200);
    for c in 0..10 {
        let seqs: Vec<u64> = applied.iter().filter(|a| a.0 == c).map(|a| a.1).collect();
        assert_eq!(
            seqs,
            (1..=20).collect::<Vec<_>>(),
            "client {c} in order, once"
        );
    }
    // The figures are published right after the acks go out.
    let t = Instant::now();
    loop {
        let c = ingress.counters(Target::Vm(1)).expect("counters");
        if (c.applied, c.acked) == (200, 200) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "counters: {c:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Out of order: seq 22 (floor 21) before 21 is dropped, then both go.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let raw = |seq: u64, floor: u64| {
        let p = payload(3, seq);
        let mut e = UpdatesEncoder::new(1, None);
        e.push(&WireUpdate {
            client: 3,
            seq,
            floor,
            ts: 1,
            payload: &p,
        })
        .unwrap();
        e.finish()
    };
    sock.send_to(&raw(22, 21), ingress.local_addr()).unwrap();
    sock.send_to(b"garbage", ingress.local_addr()).unwrap();
    let t = Instant::now();
    while ingress.counters(Target::Vm(1)).unwrap().dropped < 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "dropped out of order");
        std::thread::sleep(Duration::from_millis(2));
    }
    sock.send_to(&raw(21, 21), ingress.local_addr()).unwrap();
    sock.send_to(&raw(22, 21), ingress.local_addr()).unwrap();
    let t = Instant::now();
    while guest.applied.lock().unwrap().len() < 202 {
        assert!(t.elapsed() < Duration::from_secs(5), "21 and 22 applied");
        std::thread::sleep(Duration::from_millis(2));
    }
    let tail: Vec<_> = guest.applied.lock().unwrap()[200..].to_vec();
    assert_eq!(tail, vec![(3, 21), (3, 22)]);
    assert_eq!(ingress.stats().bad_datagrams, 1);
    // A zone this daemon does not know is refused.
    tx.set_zone(9, ingress.local_addr());
    tx.send(9, 1, &payload(1, 1)).unwrap();
    tx.poll(Duration::from_millis(100)).unwrap();
    assert!(tx.stats().refused >= 1);
    stop.store(true, Ordering::Release);
}

#[test]
fn a_moved_zone_redirects_and_the_client_follows() {
    let (target, guest, stop) = start(None);
    let (old, _g2, stop2) = start(Some(target.local_addr()));
    let mut tx = ClientSender::new(SenderConfig {
        retry_after: Duration::from_millis(50),
        ..SenderConfig::default()
    })
    .expect("sender");
    // Zone 2 moved away from `old` (to `target`).
    tx.set_zone(2, old.local_addr());
    tx.send(2, 7, &payload(7, 1)).unwrap();
    tx.flush().unwrap();
    let t = Instant::now();
    while tx.zone_addr(2) != Some(target.local_addr()) {
        assert!(t.elapsed() < Duration::from_secs(5), "redirected");
        tx.poll(Duration::from_millis(10)).unwrap();
    }
    assert!(tx.stats().redirects >= 1);
    let t = Instant::now();
    while old.stats().redirected < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the old daemon counts it"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(guest);
    stop.store(true, Ordering::Release);
    stop2.store(true, Ordering::Release);
}

#[test]
fn a_guest_lying_about_its_consumer_cannot_stall_the_ingress() {
    let (ingress, guest, stop) = start(None);
    stop.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(10));
    let consumer = GuestAddress(RING + 8 * abi::INBOX_WORD_CONSUMER as u64);
    guest.mem.write_obj(u64::MAX, consumer).unwrap();
    let mut tx = ClientSender::new(SenderConfig::default()).expect("sender");
    tx.set_zone(1, ingress.local_addr());
    tx.set_zone(9, ingress.local_addr());
    for s in 1..=3 {
        tx.send(1, 4, &payload(4, s)).unwrap();
    }
    tx.poll(Duration::from_millis(50)).unwrap();
    // Nothing the guest did not answer is acknowledged...
    let t = Instant::now();
    loop {
        let c = ingress.counters(Target::Vm(1)).expect("counters");
        if c.dropped >= 3 {
            assert_eq!(c.acked, 0, "{c:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{c:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // ... and the ingress still answers.
    tx.send(9, 1, &payload(1, 1)).unwrap();
    let t = Instant::now();
    while tx.stats().refused == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the ingress answers");
        tx.poll(Duration::from_millis(10)).unwrap();
    }
    assert_eq!(tx.stats().acked, 0);
}

/// A figure, not a check: 10,000 clients' updates through one ingress and
/// a fake guest (`cargo test --release -p forkd --lib throughput -- --ignored --nocapture`).
#[test]
#[ignore]
fn throughput_of_ten_thousand_clients() {
    // The zone guest's ring, drained every millisecond.
    let (ingress, guest, stop) = start_with(None, abi::INBOX_SLOTS);
    let mut tx = ClientSender::new(SenderConfig::default()).expect("sender");
    tx.set_zone(1, ingress.local_addr());
    let p = payload(1, 1);
    let t = Instant::now();
    let rounds = 5u64;
    for _ in 0..rounds {
        for c in 0..10_000 {
            tx.send(1, c, &p[..256]).expect("send");
        }
        tx.poll(Duration::from_millis(1)).expect("poll");
    }
    assert!(tx.wait_acked(Duration::from_secs(120)).expect("poll"));
    let dt = t.elapsed().as_secs_f64();
    let n = rounds * 10_000;
    eprintln!(
        "{n} updates in {dt:.2} s: {:.0} updates/s, {} datagrams, p50 {} µs, p99 {} µs",
        n as f64 / dt,
        tx.stats().datagrams,
        tx.latency_us(0.5),
        tx.latency_us(0.99)
    );
    assert_eq!(guest.applied.lock().unwrap().len() as u64, n);
    stop.store(true, Ordering::Release);
}
