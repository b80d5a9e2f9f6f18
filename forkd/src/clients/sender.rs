//! The client library: [`ClientSender`] sends updates of many simulated
//! clients from one UDP socket, several per datagram, keeps every update
//! until it is acknowledged, re-sends what is unacknowledged after a
//! timeout, follows redirects (a zone that migrated), and measures the
//! update → applied latency from the timestamps the acks echo.
//!
//! Sequence numbers are per (zone, client), from 1. Each update carries
//! the client's oldest unacknowledged sequence number (its floor), which
//! lets the daemons keep every client's updates in order (`ingress`).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::wire::{self, Datagram, UpdatesEncoder, WireUpdate};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no address known for zone {0}; call set_zone first")]
    UnknownZone(u64),
    #[error("payload of {0} bytes (1..={max})", max = wire::PAYLOAD_MAX)]
    Payload(usize),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The local address to send from (and receive acks on).
    pub bind: SocketAddr,
    /// An update unacknowledged this long is sent again.
    pub retry_after: Duration,
    /// Bytes per datagram at most (several updates each).
    pub max_datagram: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            retry_after: Duration::from_millis(200),
            max_datagram: 16 * 1024,
        }
    }
}

/// What a sender did so far.
#[derive(Debug, Clone, Default)]
pub struct SenderStats {
    /// Updates handed to `send`.
    pub updates: u64,
    /// Updates put on the wire (re-sends included) and datagrams sent.
    pub sent: u64,
    pub datagrams: u64,
    pub resent: u64,
    /// Updates acknowledged (first acknowledgement only), of which the
    /// daemon said applied before (a re-sent duplicate).
    pub acked: u64,
    pub acked_duplicate: u64,
    pub redirects: u64,
    pub refused: u64,
    /// Datagrams received that did not decode.
    pub bad: u64,
}

struct Pending {
    payload: Vec<u8>,
    /// When it was last put on the wire (None: not yet).
    sent_at: Option<Instant>,
    first_ts: u64,
}

#[derive(Default)]
struct ClientState {
    next_seq: u64,
    unacked: BTreeMap<u64, Pending>,
    /// Re-sends since the client's last acknowledgement: each doubles the
    /// wait before the next (up to 16 × `retry_after`).
    backoff: u32,
}

/// Many clients' updates to many zones, from one socket.
pub struct ClientSender {
    sock: UdpSocket,
    cfg: SenderConfig,
    epoch: Instant,
    zones: HashMap<u64, SocketAddr>,
    clients: BTreeMap<(u64, u32), ClientState>,
    outbox: HashMap<u64, UpdatesEncoder>,
    stats: SenderStats,
    latency: hdrhistogram::Histogram<u64>,
    buf: Vec<u8>,
}

impl ClientSender {
    pub fn new(cfg: SenderConfig) -> Result<Self, SendError> {
        let sock = UdpSocket::bind(cfg.bind)?;
        let latency = hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(ClientSender {
            sock,
            cfg,
            epoch: Instant::now(),
            zones: HashMap::new(),
            clients: BTreeMap::new(),
            outbox: HashMap::new(),
            stats: SenderStats::default(),
            latency,
            buf: vec![0u8; wire::DATAGRAM_MAX + 1],
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Updates for zone `vm` go to the ingress at `addr` from now on.
    pub fn set_zone(&mut self, vm: u64, addr: SocketAddr) {
        self.zones.insert(vm, addr);
    }

    pub fn zone_addr(&self, vm: u64) -> Option<SocketAddr> {
        self.zones.get(&vm).copied()
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Queues the next update of `client` for zone `vm`; returns its
    /// sequence number. Sent at the next [`ClientSender::flush`] (or when
    /// a datagram fills up).
    pub fn send(&mut self, vm: u64, client: u32, payload: &[u8]) -> Result<u64, SendError> {
        if payload.is_empty() || payload.len() > wire::PAYLOAD_MAX {
            return Err(SendError::Payload(payload.len()));
        }
        if !self.zones.contains_key(&vm) {
            return Err(SendError::UnknownZone(vm));
        }
        let ts = self.now_us();
        let st = self.clients.entry((vm, client)).or_default();
        st.next_seq += 1;
        let seq = st.next_seq;
        st.unacked.insert(
            seq,
            Pending {
                payload: payload.to_vec(),
                sent_at: None,
                first_ts: ts,
            },
        );
        self.stats.updates += 1;
        self.put(vm, client, seq)?;
        Ok(seq)
    }

    /// Sends update `seq` of `client` again now, as a duplicate would
    /// arrive (a test hook; the payload must be the original's).
    pub fn resend_now(
        &mut self,
        vm: u64,
        client: u32,
        seq: u64,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let addr = *self.zones.get(&vm).ok_or(SendError::UnknownZone(vm))?;
        let floor = self
            .clients
            .get(&(vm, client))
            .and_then(|s| s.unacked.keys().next().copied())
            .unwrap_or(seq);
        let mut enc = UpdatesEncoder::new(vm, None);
        enc.push(&WireUpdate {
            client,
            seq,
            floor: floor.min(seq),
            ts: self.now_us(),
            payload,
        })
        .map_err(|_| SendError::Payload(payload.len()))?;
        self.sock.send_to(&enc.finish(), addr)?;
        Ok(())
    }

    /// Adds pending update `seq` of `client` to the zone's datagram.
    fn put(&mut self, vm: u64, client: u32, seq: u64) -> Result<(), SendError> {
        let now = Instant::now();
        let ts = self.now_us();
        let Some(st) = self.clients.get_mut(&(vm, client)) else {
            return Ok(());
        };
        let floor = st.unacked.keys().next().copied().unwrap_or(seq);
        let Some(p) = st.unacked.get_mut(&seq) else {
            return Ok(());
        };
        if p.sent_at.is_some() {
            self.stats.resent += 1;
        }
        p.sent_at = Some(now);
        let u = WireUpdate {
            client,
            seq,
            floor,
            // The first send's time: latency counts from the update's birth.
            ts: if p.first_ts == 0 { ts } else { p.first_ts },
            payload: &p.payload,
        };
        let enc = self
            .outbox
            .entry(vm)
            .or_insert_with(|| UpdatesEncoder::new(vm, None));
        if !enc.is_empty() && enc.len() + UpdatesEncoder::cost(&u) > self.cfg.max_datagram {
            let full = std::mem::replace(enc, UpdatesEncoder::new(vm, None));
            let addr = *self.zones.get(&vm).ok_or(SendError::UnknownZone(vm))?;
            self.sock.send_to(&full.finish(), addr)?;
            self.stats.datagrams += 1;
        }
        let enc = self
            .outbox
            .entry(vm)
            .or_insert_with(|| UpdatesEncoder::new(vm, None));
        enc.push(&u)
            .map_err(|_| SendError::Payload(u.payload.len()))?;
        self.stats.sent += 1;
        Ok(())
    }

    /// Sends every datagram being filled.
    pub fn flush(&mut self) -> Result<(), SendError> {
        for (vm, enc) in std::mem::take(&mut self.outbox) {
            if enc.is_empty() {
                continue;
            }
            let addr = *self.zones.get(&vm).ok_or(SendError::UnknownZone(vm))?;
            self.sock.send_to(&enc.finish(), addr)?;
            self.stats.datagrams += 1;
        }
        Ok(())
    }

    /// Flushes, takes what arrives for up to `wait`, then re-sends what
    /// timed out.
    pub fn poll(&mut self, wait: Duration) -> Result<(), SendError> {
        self.flush()?;
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_micros(100))))?;
            match self.sock.recv_from(&mut self.buf) {
                Ok((n, _from)) => {
                    let buf = std::mem::take(&mut self.buf);
                    let handled = self.incoming(&buf[..n.min(wire::DATAGRAM_MAX)]);
                    self.buf = buf;
                    handled?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.retry()?;
        self.flush()
    }

    fn incoming(&mut self, b: &[u8]) -> Result<(), SendError> {
        match wire::decode(b) {
            Ok(Datagram::Acks { vm, acks }) => {
                let now = self.now_us();
                for a in acks {
                    let Some(st) = self.clients.get_mut(&(vm, a.client)) else {
                        continue;
                    };
                    if st.unacked.remove(&a.seq).is_some() {
                        st.backoff = 0;
                        self.stats.acked += 1;
                        if a.status == wire::ACK_DUPLICATE {
                            self.stats.acked_duplicate += 1;
                        }
                        let _ = self.latency.record(now.saturating_sub(a.ts).max(1));
                    }
                }
            }
            Ok(Datagram::Redirect { vm, to }) => {
                self.stats.redirects += 1;
                let to = SocketAddr::V4(to);
                if self.zones.get(&vm) != Some(&to) {
                    self.zones.insert(vm, to);
                    self.resend_zone(vm)?;
                }
            }
            Ok(Datagram::Refused { .. }) => self.stats.refused += 1,
            Ok(Datagram::Updates { .. }) | Err(_) => self.stats.bad += 1,
        }
        Ok(())
    }

    /// Every unacknowledged update of `vm` again, in order per client.
    fn resend_zone(&mut self, vm: u64) -> Result<(), SendError> {
        let todo: Vec<(u32, u64)> = self
            .clients
            .range((vm, 0)..=(vm, u32::MAX))
            .flat_map(|((_, c), st)| st.unacked.keys().map(move |s| (*c, *s)))
            .collect();
        for (c, s) in todo {
            self.put(vm, c, s)?;
        }
        Ok(())
    }

    /// Re-sends every update unacknowledged for `retry_after` (doubled per
    /// re-send without progress, up to 16 times): a client with one timed
    /// out sends all its unacknowledged ones, in order.
    fn retry(&mut self) -> Result<(), SendError> {
        let now = Instant::now();
        let after = self.cfg.retry_after;
        let todo: Vec<(u64, u32, Vec<u64>)> = self
            .clients
            .iter_mut()
            .filter(|(_, st)| {
                let wait = after * (1u32 << st.backoff.min(4));
                st.unacked
                    .values()
                    .next()
                    .is_some_and(|p| p.sent_at.is_none_or(|t| now.duration_since(t) >= wait))
            })
            .map(|((vm, c), st)| {
                st.backoff += 1;
                (*vm, *c, st.unacked.keys().copied().collect())
            })
            .collect();
        for (vm, c, seqs) in todo {
            for s in seqs {
                self.put(vm, c, s)?;
            }
        }
        Ok(())
    }

    /// Updates not acknowledged yet.
    pub fn unacked(&self) -> usize {
        self.clients.values().map(|s| s.unacked.len()).sum()
    }

    /// Polls until every update is acknowledged or `limit` passed; true
    /// if all were.
    pub fn wait_acked(&mut self, limit: Duration) -> Result<bool, SendError> {
        let deadline = Instant::now() + limit;
        self.flush()?;
        while self.unacked() > 0 {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.poll(Duration::from_millis(10))?;
        }
        Ok(true)
    }

    pub fn stats(&self) -> SenderStats {
        self.stats.clone()
    }

    /// The update → acknowledged latency at quantile `q` (0..=1), µs.
    pub fn latency_us(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }
}
