//! Loopback tests of the whole protocol, each in its own network namespace
//! (see `common`): delivery, loss and re-requests, lockstep suppression,
//! rejection of forged/replayed/foreign frames, end-game unicast, push,
//! rate limiting and flow control.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use multicast::frame::{self, Fragment, Header, Kind, Request};
use multicast::{LossInjection, RateConfig, Receiver, Sender, Session};

const BLOCK: usize = 4096;
const LONG: Duration = Duration::from_secs(20);

fn raw() -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("raw socket")
}

fn data_frame(s: &Session, origin: u32, seq: u64, block: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    Fragment {
        block,
        block_len: bytes.len() as u32,
        offset: 0,
        index: 0,
        count: 1,
        bytes,
    }
    .encode(&mut p);
    let mut f = Vec::new();
    let h = Header {
        kind: Kind::Data,
        session: s.id,
        origin,
        seq,
        flags: 0,
    };
    frame::encode(&mut f, s, &h, &p);
    f
}

fn request_frame(s: &Session, origin: u32, seq: u64, rate: u64, blocks: &[u64]) -> Vec<u8> {
    let mut p = Vec::new();
    Request::encode(rate, blocks, &mut p);
    let mut f = Vec::new();
    let h = Header {
        kind: Kind::Request,
        session: s.id,
        origin,
        seq,
        flags: 0,
    };
    frame::encode(&mut f, s, &h, &p);
    f
}

#[test]
fn delivers_every_block_to_every_receiver() {
    in_netns("delivers_every_block_to_every_receiver", || {
        let s = session(1);
        let mut cfg = sender_cfg(s.clone(), 40001);
        cfg.rate.max_rate = 20 << 20;
        let sender = Sender::start(
            cfg,
            Pattern {
                count: 256,
                len: BLOCK,
            },
        )
        .expect("sender");
        let server = sender.local_addr();
        let (a, rx_a) = Receiver::with_channel(receiver_cfg(s.clone(), 40001, server), 4096)
            .expect("receiver a");
        let (b, rx_b) = Receiver::with_channel(receiver_cfg(s.clone(), 40001, server), 4096)
            .expect("receiver b");
        a.request(&(0..128).collect::<Vec<_>>()).expect("request a");
        b.request(&(128..256).collect::<Vec<_>>())
            .expect("request b");
        let (mut ga, mut gb) = (Got::default(), Got::default());
        assert!(ga.wait_for(&rx_a, BLOCK, 0..128, LONG), "a missing blocks");
        assert!(
            gb.wait_for(&rx_b, BLOCK, 128..256, LONG),
            "b missing blocks"
        );
        std::thread::sleep(Duration::from_millis(100));
        ga.drain(&rx_a, BLOCK);
        gb.drain(&rx_b, BLOCK);
        // Each also got (nearly) all of the other's blocks without asking.
        let a_extra = (128..256).filter(|i| ga.blocks.contains_key(i)).count();
        let b_extra = (0..128).filter(|i| gb.blocks.contains_key(i)).count();
        println!("a got {a_extra}/128 of b's, b got {b_extra}/128 of a's");
        println!("sender {:?}", sender.stats());
        assert!(a_extra >= 115 && b_extra >= 115, "{a_extra} {b_extra}");
        assert!(ga
            .blocks
            .values()
            .all(|blk| blk.requested == (blk.index < 128)));
        let st = sender.stats();
        // Re-requests of blocks still queued (a backlog, not loss) are
        // answered by the queued multicast.
        assert!(st.blocks_requested >= 256);
        assert_eq!((st.blocks_multicast, st.blocks_unicast), (256, 0));
        assert_eq!(st.frames_sent, 256 * 3, "4 KiB = 3 frames at MTU 1500");
        assert_eq!(a.outstanding() + b.outstanding(), 0);
    });
}

#[test]
fn loss_is_repaired_by_rerequests() {
    in_netns("loss_is_repaired_by_rerequests", || {
        let s = session(2);
        let mut cfg = sender_cfg(s.clone(), 40002);
        cfg.rate.max_rate = 20 << 20;
        let sender = Sender::start(
            cfg,
            Pattern {
                count: 200,
                len: BLOCK,
            },
        )
        .expect("sender");
        let mut rs = Vec::new();
        for seed in 1..=3 {
            let mut rc = receiver_cfg(s.clone(), 40002, sender.local_addr());
            rc.loss = Some(LossInjection {
                drop_probability: 0.2,
                seed,
            });
            rs.push(Receiver::with_channel(rc, 4096).expect("receiver"));
        }
        let all: Vec<u64> = (0..200).collect();
        for (r, _) in &rs {
            r.request(&all).expect("request");
        }
        for (r, rx) in &rs {
            let mut g = Got::default();
            assert!(
                g.wait_for(rx, BLOCK, 0..200, LONG),
                "missing blocks: {:?}",
                r.stats()
            );
            assert!(g.gave_up.is_empty());
            let st = r.stats();
            println!("receiver {st:?}");
            assert!(st.injected_drops > 0 && st.rerequests > 0, "{st:?}");
            assert_eq!(st.delivered_requested, 200);
        }
        let st = sender.stats();
        println!("sender {st:?}");
        assert!(st.retries_received > 0);
        assert_eq!(st.forged + st.replayed + st.foreign + st.malformed, 0);
    });
}

#[test]
fn lockstep_requests_are_answered_once() {
    in_netns("lockstep_requests_are_answered_once", || {
        let s = session(3);
        let mut cfg = sender_cfg(s.clone(), 40003);
        cfg.lockstep_window = Duration::from_millis(500);
        let sender = Sender::start(
            cfg,
            Pattern {
                count: 16,
                len: BLOCK,
            },
        )
        .expect("sender");
        let server = sender.local_addr();
        let (a, rx_a) =
            Receiver::with_channel(receiver_cfg(s.clone(), 40003, server), 64).expect("a");
        let (b, rx_b) =
            Receiver::with_channel(receiver_cfg(s.clone(), 40003, server), 64).expect("b");
        a.request(&[7]).expect("a asks");
        b.request(&[7]).expect("b asks");
        let (mut ga, mut gb) = (Got::default(), Got::default());
        assert!(ga.wait_for(&rx_a, BLOCK, [7], LONG));
        assert!(gb.wait_for(&rx_b, BLOCK, [7], LONG));
        // Two more requests from another origin, back to back, for block 9.
        let sock = raw();
        sock.send_to(&request_frame(&s, 4242, 1, 0, &[9]), server)
            .expect("send");
        sock.send_to(&request_frame(&s, 4343, 1, 0, &[9]), server)
            .expect("send");
        assert!(ga.wait_for(&rx_a, BLOCK, [9], LONG));
        std::thread::sleep(Duration::from_millis(50));
        let st = sender.stats();
        println!("sender {st:?}");
        assert_eq!(st.blocks_requested, 4);
        assert_eq!(st.blocks_multicast, 2, "each block multicast once");
        assert_eq!(st.lockstep_suppressed, 2);
        assert_eq!(st.frames_sent, 6);
        assert!(ga.blocks[&7].requested && gb.blocks[&7].requested);
    });
}

#[test]
fn forged_replayed_and_foreign_frames_are_rejected() {
    in_netns("forged_replayed_and_foreign_frames_are_rejected", || {
        let s = session(4);
        let sender = Sender::start(
            sender_cfg(s.clone(), 40004),
            Pattern {
                count: 4,
                len: BLOCK,
            },
        )
        .expect("sender");
        let server = sender.local_addr();
        let (r, rx) =
            Receiver::with_channel(receiver_cfg(s.clone(), 40004, server), 64).expect("receiver");
        let group: SocketAddr = group(40004).addr().into();
        let sock = raw();
        let forged_key = Session {
            key: multicast::SessionKey([0xee; 32]),
            ..s.clone()
        };
        let foreign = session(99);
        let good = data_frame(&s, 77, 1, 1000, b"valid block");
        sock.send_to(&data_frame(&forged_key, 77, 2, 1001, b"forged"), group)
            .expect("send");
        sock.send_to(&data_frame(&foreign, 77, 3, 1002, b"foreign"), group)
            .expect("send");
        let mut tampered = good.clone();
        let at = tampered.len() - frame::MAC_LEN - 1;
        tampered[at] ^= 1;
        sock.send_to(&tampered, group).expect("send");
        sock.send_to(&good, group).expect("send");
        sock.send_to(&good, group).expect("send replay");
        sock.send_to(&request_frame(&s, 77, 4, 0, &[1]), group)
            .expect("send request to the group");
        assert!(wait_until(LONG, || {
            let st = r.stats();
            st.forged == 2 && st.foreign == 1 && st.replayed == 1 && st.malformed == 1
        }));
        let mut delivered = Vec::new();
        while let Ok(multicast::Event::Block(b)) = rx.recv_timeout(Duration::from_millis(200)) {
            delivered.push((b.index, b.data));
        }
        assert_eq!(delivered, vec![(1000, b"valid block".to_vec())]);
        println!("receiver {:?}", r.stats());

        // The sender: only the one valid request is answered.
        let req = request_frame(&s, 55, 1, 0, &[2]);
        sock.send_to(&request_frame(&forged_key, 55, 2, 0, &[3]), server)
            .expect("send");
        sock.send_to(&request_frame(&foreign, 55, 3, 0, &[3]), server)
            .expect("send");
        sock.send_to(&req, server).expect("send");
        sock.send_to(&req, server).expect("send replay");
        assert!(wait_until(LONG, || {
            let st = sender.stats();
            st.forged == 1 && st.foreign == 1 && st.replayed == 1 && st.frames_sent == 3
        }));
        std::thread::sleep(Duration::from_millis(100));
        let st = sender.stats();
        println!("sender {st:?}");
        assert_eq!(
            (st.requests, st.blocks_multicast, st.frames_sent),
            (1, 1, 3)
        );
    });
}

#[test]
fn end_game_answers_retries_by_unicast() {
    in_netns("end_game_answers_retries_by_unicast", || {
        let s = session(5);
        let mut cfg = sender_cfg(s.clone(), 40005);
        cfg.end_game.window = 16;
        cfg.end_game.retry_fraction = 0.5;
        let len = 1024;
        let sender = Sender::start(cfg, Pattern { count: 100, len }).expect("sender");
        let mut rc = receiver_cfg(s.clone(), 40005, sender.local_addr());
        rc.loss = Some(LossInjection {
            drop_probability: 0.4,
            seed: 7,
        });
        let (r, rx) = Receiver::with_channel(rc, 1024).expect("receiver");
        r.request(&(0..100).collect::<Vec<_>>()).expect("request");
        let mut g = Got::default();
        assert!(g.wait_for(&rx, len, 0..100, LONG), "{:?}", r.stats());
        let st = sender.stats();
        println!("sender {st:?}\nreceiver {:?}", r.stats());
        assert!(st.end_game_entered >= 1, "{st:?}");
        assert!(st.blocks_unicast > 0, "{st:?}");
        assert!(g.blocks.values().any(|b| b.unicast));
        assert_eq!(r.stats().delivered_requested, 100);
    });
}

#[test]
fn push_streams_blocks_nobody_asked_for() {
    in_netns("push_streams_blocks_nobody_asked_for", || {
        let s = session(6);
        let mut cfg = sender_cfg(s.clone(), 40006);
        cfg.rate.max_rate = 20 << 20;
        let sender = Sender::start(
            cfg,
            Pattern {
                count: 64,
                len: BLOCK,
            },
        )
        .expect("sender");
        let (r, rx) =
            Receiver::with_channel(receiver_cfg(s.clone(), 40006, sender.local_addr()), 256)
                .expect("receiver");
        sender.push(&(0..64).collect::<Vec<_>>()).expect("push");
        let mut g = Got::default();
        assert!(g.wait_for(&rx, BLOCK, 0..64, LONG), "{:?}", r.stats());
        assert!(g.blocks.values().all(|b| b.pushed && !b.requested));
        let st = sender.stats();
        assert_eq!((st.blocks_pushed, st.blocks_requested), (64, 0));
        assert_eq!(r.stats().request_frames, 0);
        assert_eq!(sender.push_pending(), 0);
    });
}

#[test]
fn rate_limit_is_respected() {
    in_netns("rate_limit_is_respected", || {
        let s = session(7);
        let mut cfg = sender_cfg(s.clone(), 40007);
        let limit = 1u64 << 20;
        cfg.rate = RateConfig {
            min_rate: limit,
            max_rate: limit,
            ..RateConfig::default()
        };
        let burst = cfg.rate.burst;
        let sender = Sender::start(
            cfg,
            Pattern {
                count: 256,
                len: BLOCK,
            },
        )
        .expect("sender");
        let (r, rx) =
            Receiver::with_channel(receiver_cfg(s.clone(), 40007, sender.local_addr()), 512)
                .expect("receiver");
        let t0 = Instant::now();
        sender.push(&(0..256).collect::<Vec<_>>()).expect("push");
        let mut g = Got::default();
        assert!(g.wait_for(&rx, BLOCK, 0..256, LONG), "{:?}", r.stats());
        let elapsed = t0.elapsed().as_secs_f64();
        let bytes = sender.stats().bytes_sent;
        let expected = (bytes - burst) as f64 / limit as f64;
        println!("{bytes} bytes in {elapsed:.3} s, expected >= {expected:.3} s");
        assert!(
            elapsed >= expected * 0.95,
            "too fast: {elapsed} < {expected}"
        );
        assert!(
            elapsed <= expected * 2.0 + 0.5,
            "too slow: {elapsed} vs {expected}"
        );
    });
}

#[test]
fn flow_control_throttles_to_the_reported_rates() {
    in_netns("flow_control_throttles_to_the_reported_rates", || {
        let s = session(8);
        let mut cfg = sender_cfg(s.clone(), 40008);
        cfg.rate = RateConfig {
            min_rate: 256 << 10,
            max_rate: 100 << 20,
            growth: 1.0,
            report_ttl: Duration::from_secs(30),
            ..RateConfig::default()
        };
        let sender = Sender::start(
            cfg,
            Pattern {
                count: 64,
                len: BLOCK,
            },
        )
        .expect("sender");
        let server = sender.local_addr();
        assert!(wait_until(LONG, || sender.stats().rate == 100 << 20));
        // Two receivers report 1 and 3 MiB/s (piggybacked on requests for a
        // block that does not exist, so nothing is sent).
        let sock = raw();
        sock.send_to(&request_frame(&s, 1, 1, 1 << 20, &[1000]), server)
            .expect("send");
        sock.send_to(&request_frame(&s, 2, 1, 3 << 20, &[1001]), server)
            .expect("send");
        let target = 2u64 << 20;
        assert!(
            wait_until(LONG, || sender.stats().rate.abs_diff(target) < target / 50),
            "rate {} not near {target}",
            sender.stats().rate
        );
        // The sending pace follows: 64 pushed blocks take ~0.14 s at 2 MiB/s.
        let (r, rx) =
            Receiver::with_channel(receiver_cfg(s.clone(), 40008, server), 256).expect("receiver");
        let t0 = Instant::now();
        sender.push(&(0..64).collect::<Vec<_>>()).expect("push");
        let mut g = Got::default();
        assert!(g.wait_for(&rx, BLOCK, 0..64, LONG), "{:?}", r.stats());
        let elapsed = t0.elapsed().as_secs_f64();
        let st = sender.stats();
        let expected = (st.bytes_sent - (64 << 10)) as f64 / target as f64;
        println!("sender {st:?}; {elapsed:.3} s, expected >= {expected:.3} s");
        assert_eq!(st.unknown_blocks, 2);
        assert!(elapsed >= expected * 0.9, "{elapsed} < {expected}");
    });
}

#[test]
fn caps_refuse_and_retries_give_up() {
    in_netns("caps_refuse_and_retries_give_up", || {
        let s = session(9);
        // Nobody serves this address: every request goes unanswered.
        let silent = raw();
        let server = silent.local_addr().expect("addr");
        let mut rc = receiver_cfg(s.clone(), 40009, server);
        rc.max_outstanding = 4;
        rc.max_attempts = 3;
        rc.retry_timeout = Duration::from_millis(20);
        rc.max_retry_timeout = Duration::from_millis(40);
        let (r, rx) = Receiver::with_channel(rc, 16).expect("receiver");
        assert!(matches!(
            r.request(&[1, 2, 3, 4, 5]),
            Err(multicast::RequestError::TooMany { cap: 4, .. })
        ));
        assert_eq!(r.outstanding(), 0, "a refused call records nothing");
        r.request(&[1, 2]).expect("within the cap");
        r.request(&[2]).expect("already wanted: not asked again");
        let t0 = Instant::now();
        let mut g = Got::default();
        assert!(wait_until(Duration::from_secs(5), || {
            g.drain(&rx, BLOCK);
            g.gave_up.len() == 2
        }));
        println!("gave up after {:?}: {:?}", t0.elapsed(), r.stats());
        let st = r.stats();
        assert_eq!((st.requested, st.rerequests, st.gave_up), (2, 4, 2));
        assert_eq!(r.outstanding(), 0);
        // Stopping is prompt.
        let t1 = Instant::now();
        r.stop();
        assert!(t1.elapsed() < Duration::from_millis(500));
    });
}
