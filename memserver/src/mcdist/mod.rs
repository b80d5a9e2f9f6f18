//! mcdist: a family's pages by IP multicast (SnowFlock's memory
//! distribution), on the [`multicast`] crate.
//!
//! **Server side** ([`Mcdist`], owned by the [`crate::server::MemServer`]):
//! per family a [`multicast::Sender`] whose blocks are the family's 4 KiB
//! pages, read from its [`PageSource`]. The reply to the first request for
//! a page goes to the family's group, so every host of the family gets it;
//! lockstep suppression, flow control, the end-game switch to unicast and
//! push come from the crate.
//!
//! - **Session**: id = the family id; key = BLAKE3
//!   `derive_key("forkd mcdist v1", secret)` of the family secret
//!   ([`session`]). Only holders of the secret can ask for pages or make
//!   frames a receiver accepts; the derived key differs from the unicast
//!   wire's MAC key, so a frame of one protocol never passes for the other.
//! - **Group and port**: from a bounded pool ([`McdistConfig::groups`]
//!   slots): slot `s` is group `group_base + s`, data port
//!   `port_base + s % ports`; the pool starts at a random slot, so two
//!   servers on one link rarely pick the same group (if they do, frames of
//!   the other session are rejected as foreign and counted: only bandwidth
//!   is lost). A slot is freed when its family is removed.
//! - **Push**: the ranges given at [`Mcdist::add_family`] (the pages the
//!   guest allocator had handed out at the fork) are streamed to the group
//!   when [`Mcdist::start_push`] is called — once the family's receivers
//!   have joined (on one host: after the host receiver started; across
//!   hosts: once every clone host acknowledged the descriptor).
//!
//! **Host side** ([`host::HostReceiver`]): one receiver per family per
//! host, shared by the host's clones, a [`PageSource`] with a bounded page
//! cache and per-clone subscribers.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use multicast::{
    BlockSource, GroupConfig, RateConfig, Sender, SenderConfig, SenderStats, Session, SessionId,
    SessionKey,
};

use crate::auth::{random_u64, FamilyKey};
use crate::sync::lock;
use crate::{PageSource, PAGE_SIZE};

pub mod host;

/// The context string of the session key derivation.
pub const KEY_CONTEXT: &str = "forkd mcdist v1";

/// The multicast session of a family: its id, and a key derived from its
/// secret.
pub fn session(key: &FamilyKey) -> Session {
    Session {
        id: SessionId(key.id()),
        key: SessionKey(blake3::derive_key(KEY_CONTEXT, key.secret())),
    }
}

/// How the server distributes by multicast.
#[derive(Debug, Clone)]
pub struct McdistConfig {
    /// Local address of the interface groups are sent on.
    pub interface: Ipv4Addr,
    /// Local address the families' request sockets bind (ephemeral ports).
    pub bind: Ipv4Addr,
    /// First group of the pool (239.77.0.0: administratively scoped).
    pub group_base: Ipv4Addr,
    /// Groups in the pool (at most 65536): families at once.
    pub groups: u32,
    /// First data port.
    pub port_base: u16,
    /// Data ports used (slot `s` uses `port_base + s % ports`).
    pub ports: u16,
    /// Multicast TTL (1: the local link).
    pub ttl: u32,
    /// The senders' pacing and flow control.
    pub rate: RateConfig,
    /// The path MTU frames are sized to (a 4 KiB page fits one frame from
    /// an MTU of 4188 on: a page lost is then one frame lost).
    pub mtu: usize,
}

impl McdistConfig {
    /// Defaults on the interface with local address `ip` (the memory
    /// server's address; 127.0.0.1 on a single host).
    pub fn on(ip: Ipv4Addr) -> McdistConfig {
        McdistConfig {
            interface: ip,
            bind: ip,
            group_base: Ipv4Addr::new(239, 77, 0, 0),
            groups: 4096,
            port_base: 47000,
            ports: 1000,
            ttl: 1,
            rate: RateConfig {
                max_rate: 400 << 20,
                ..RateConfig::default()
            },
            mtu: multicast::interface_mtu(ip).unwrap_or(multicast::frame::DEFAULT_MTU),
        }
    }
}

/// Where a family's pages are multicast: what a host needs (with the
/// family key) to join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McEndpoint {
    pub group: Ipv4Addr,
    /// The UDP port data frames go to.
    pub port: u16,
    /// The sender's request address.
    pub server: SocketAddr,
}

/// Why a family could not be distributed by multicast.
#[derive(Debug, thiserror::Error)]
pub enum McdistError {
    #[error("fork family {0} is already distributed by multicast")]
    FamilyExists(u64),
    #[error("all {0} multicast groups of the pool are in use")]
    NoGroup(u32),
    #[error("invalid multicast configuration: {0}")]
    BadConfig(&'static str),
    #[error("cannot start the multicast sender of family {family}")]
    Sender {
        family: u64,
        #[source]
        source: multicast::SenderError,
    },
}

/// Why a push could not be started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartPushError {
    #[error("fork family {0} is not distributed by multicast")]
    UnknownFamily(u64),
    #[error("push of family {family}: {source}")]
    Queue {
        family: u64,
        #[source]
        source: multicast::PushError,
    },
}

/// One family's multicast figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McFamilyStats {
    pub family: u64,
    pub endpoint: McEndpoint,
    pub sender: SenderStats,
}

/// Multicast figures of the server: families live now, and totals over
/// every family since the server started (removed ones included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McdistStats {
    pub families: Vec<McFamilyStats>,
    /// Sums of the senders' counters (`rate` and `end_game_active` are
    /// gauges: their sum says little).
    pub total: SenderStats,
}

/// A family's pages as the sender's blocks.
struct Pages(Arc<dyn PageSource>);

impl BlockSource for Pages {
    fn read_block(&self, index: u64, out: &mut Vec<u8>) -> bool {
        let mut buf = [0u8; PAGE_SIZE];
        match self.0.read_page(index, &mut buf) {
            Ok(()) => {
                out.extend_from_slice(&buf);
                true
            }
            Err(e) => {
                tracing::debug!(page = index, error = %e, "mcdist: page not served");
                false
            }
        }
    }
}

struct McFamily {
    sender: Sender,
    slot: u32,
    endpoint: McEndpoint,
    pages: u64,
    /// (first page, count) ranges to push, taken by the first start_push.
    push: Option<Vec<(u64, u64)>>,
}

#[derive(Default)]
struct Inner {
    families: HashMap<u64, McFamily>,
    used: BTreeSet<u32>,
    next: u32,
    retired: SenderStats,
}

/// The server side of mcdist: one sender per family (see module docs).
pub struct Mcdist {
    cfg: McdistConfig,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Mcdist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mcdist")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Mcdist {
    pub fn new(cfg: McdistConfig) -> Result<Mcdist, McdistError> {
        if cfg.groups == 0 || cfg.groups > 1 << 16 || cfg.ports == 0 {
            return Err(McdistError::BadConfig(
                "groups must be 1..=65536 and ports at least 1",
            ));
        }
        let base = u32::from(cfg.group_base);
        let last = base.checked_add(cfg.groups - 1).map(Ipv4Addr::from);
        if !cfg.group_base.is_multicast() || !last.is_some_and(|l| l.is_multicast()) {
            return Err(McdistError::BadConfig(
                "the group pool must lie inside 224.0.0.0/4",
            ));
        }
        if u32::from(cfg.port_base) + u32::from(cfg.ports) > 65536 || cfg.port_base == 0 {
            return Err(McdistError::BadConfig("the data ports must be 1..=65535"));
        }
        // A random start: two servers on one link rarely share a group.
        let next = random_u64().map(|r| (r % u64::from(cfg.groups)) as u32);
        Ok(Mcdist {
            inner: Mutex::new(Inner {
                next: next.unwrap_or(0),
                ..Inner::default()
            }),
            cfg,
        })
    }

    pub fn config(&self) -> &McdistConfig {
        &self.cfg
    }

    fn endpoint_of(&self, slot: u32) -> (Ipv4Addr, u16) {
        let group = Ipv4Addr::from(u32::from(self.cfg.group_base) + slot);
        let port = self.cfg.port_base + (slot % u32::from(self.cfg.ports)) as u16;
        (group, port)
    }

    /// Starts multicasting `key`'s family from `source`; `push` are the
    /// (first page, count) ranges [`Mcdist::start_push`] will stream.
    pub fn add_family(
        &self,
        key: &FamilyKey,
        source: Arc<dyn PageSource>,
        push: Vec<(u64, u64)>,
    ) -> Result<McEndpoint, McdistError> {
        let id = key.id();
        let mut inner = lock(&self.inner);
        if inner.families.contains_key(&id) {
            return Err(McdistError::FamilyExists(id));
        }
        let groups = self.cfg.groups;
        // Bounded: at most `groups` probes.
        let slot = (0..groups)
            .map(|k| (inner.next + k) % groups)
            .find(|s| !inner.used.contains(s))
            .ok_or(McdistError::NoGroup(groups))?;
        let (group, port) = self.endpoint_of(slot);
        let gcfg = GroupConfig {
            interface: self.cfg.interface,
            ttl: self.cfg.ttl,
            ..GroupConfig::new(group, port)
        };
        let mut scfg = SenderConfig::new(session(key), gcfg, SocketAddrV4::new(self.cfg.bind, 0));
        scfg.rate = self.cfg.rate.clone();
        scfg.max_block_len = PAGE_SIZE;
        scfg.mtu = self.cfg.mtu;
        let pages = source.pages();
        let sender = Sender::start(scfg, Pages(source))
            .map_err(|source| McdistError::Sender { family: id, source })?;
        let endpoint = McEndpoint {
            group,
            port,
            server: sender.local_addr(),
        };
        inner.used.insert(slot);
        inner.next = (slot + 1) % groups;
        inner.families.insert(
            id,
            McFamily {
                sender,
                slot,
                endpoint,
                pages,
                push: Some(push),
            },
        );
        tracing::debug!(family = id, %group, port, "mcdist family added");
        Ok(endpoint)
    }

    /// Streams the family's push ranges to its group (once; later calls
    /// push nothing). Returns the pages queued.
    pub fn start_push(&self, family: u64) -> Result<u64, StartPushError> {
        let mut inner = lock(&self.inner);
        let f = inner
            .families
            .get_mut(&family)
            .ok_or(StartPushError::UnknownFamily(family))?;
        let Some(ranges) = f.push.take() else {
            return Ok(0);
        };
        let pages = f.pages;
        let blocks: Vec<u64> = ranges
            .iter()
            .flat_map(|&(first, count)| first.min(pages)..first.saturating_add(count).min(pages))
            .collect();
        f.sender
            .push(&blocks)
            .map_err(|source| StartPushError::Queue { family, source })?;
        Ok(blocks.len() as u64)
    }

    /// The family's endpoint, if it is distributed by multicast.
    pub fn endpoint(&self, family: u64) -> Option<McEndpoint> {
        lock(&self.inner).families.get(&family).map(|f| f.endpoint)
    }

    /// Stops the family's sender and frees its group; returns whether it
    /// was there.
    pub fn remove_family(&self, family: u64) -> bool {
        // Its figures move to the totals under the same lock as it leaves
        // the live list, so `stats` never misses them.
        let (sender, counted) = {
            let mut inner = lock(&self.inner);
            let Some(f) = inner.families.remove(&family) else {
                return false;
            };
            inner.used.remove(&f.slot);
            let counted = f.sender.stats();
            inner.retired.add(&counted);
            (f.sender, counted)
        };
        // Stop outside the lock (joins the thread), then count what it sent
        // meanwhile.
        let last = sender.stats();
        sender.stop();
        lock(&self.inner).retired.add(&last.since(&counted));
        true
    }

    /// Families live now and totals since the start.
    pub fn stats(&self) -> McdistStats {
        let inner = lock(&self.inner);
        let mut total = inner.retired;
        let mut families: Vec<McFamilyStats> = inner
            .families
            .iter()
            .map(|(&family, f)| {
                let sender = f.sender.stats();
                total.add(&sender);
                McFamilyStats {
                    family,
                    endpoint: f.endpoint,
                    sender,
                }
            })
            .collect();
        families.sort_by_key(|f| f.family);
        McdistStats { families, total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SourceError;

    struct Zeros(u64);
    impl PageSource for Zeros {
        fn pages(&self) -> u64 {
            self.0
        }
        fn read_page(&self, _: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
            buf.fill(0);
            Ok(())
        }
    }

    #[test]
    fn sessions_derive_from_the_family_secret() {
        let a = FamilyKey::from_parts(7, [1; 32]);
        let b = FamilyKey::from_parts(7, [2; 32]);
        assert_eq!(session(&a).id, SessionId(7));
        assert_eq!(session(&a).key.0, session(&a.clone()).key.0);
        assert_ne!(session(&a).key.0, session(&b).key.0);
        // Not the secret itself (the unicast MAC key).
        assert_ne!(session(&a).key.0, *a.secret());
    }

    #[test]
    fn groups_come_from_a_bounded_pool_and_are_freed() {
        let cfg = McdistConfig {
            groups: 2,
            ports: 2,
            ..McdistConfig::on(Ipv4Addr::LOCALHOST)
        };
        let m = Mcdist::new(cfg).expect("config");
        let k1 = FamilyKey::from_parts(1, [1; 32]);
        let k2 = FamilyKey::from_parts(2, [2; 32]);
        let k3 = FamilyKey::from_parts(3, [3; 32]);
        let e1 = m.add_family(&k1, Arc::new(Zeros(4)), vec![]).expect("1");
        assert!(matches!(
            m.add_family(&k1, Arc::new(Zeros(4)), vec![]),
            Err(McdistError::FamilyExists(1))
        ));
        let e2 = m.add_family(&k2, Arc::new(Zeros(4)), vec![]).expect("2");
        assert_ne!((e1.group, e1.port), (e2.group, e2.port));
        for e in [e1, e2] {
            assert!(e.group.is_multicast());
            assert_eq!(e.group.octets()[..2], [239, 77]);
        }
        assert!(matches!(
            m.add_family(&k3, Arc::new(Zeros(4)), vec![]),
            Err(McdistError::NoGroup(2))
        ));
        assert!(m.remove_family(1));
        assert!(!m.remove_family(1));
        let e3 = m.add_family(&k3, Arc::new(Zeros(4)), vec![]).expect("3");
        assert_eq!((e3.group, e3.port), (e1.group, e1.port), "slot reused");
        assert_eq!(m.stats().families.len(), 2);
        assert_eq!(m.start_push(9), Err(StartPushError::UnknownFamily(9)));
    }

    #[test]
    fn bad_configs_are_refused() {
        let on = McdistConfig::on(Ipv4Addr::LOCALHOST);
        for cfg in [
            McdistConfig {
                groups: 0,
                ..on.clone()
            },
            McdistConfig {
                group_base: Ipv4Addr::new(10, 0, 0, 0),
                ..on.clone()
            },
            McdistConfig {
                group_base: Ipv4Addr::new(239, 255, 255, 0),
                groups: 4096,
                ..on.clone()
            },
            McdistConfig {
                port_base: 65000,
                ports: 1000,
                ..on
            },
        ] {
            assert!(matches!(Mcdist::new(cfg), Err(McdistError::BadConfig(_))));
        }
    }
}
