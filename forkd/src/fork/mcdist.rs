//! mcdist in forkd: how a family's pages reach its clones.
//!
//! With [`Distribution::Multicast`] the family is registered with the
//! memory server's multicast side (a group and port of its pool, a sender,
//! the allocated-at-fork ranges to push), and the clones of this host share
//! one [`HostReceiver`]: it is every local clone's demand [`PageSource`]
//! (a fault on a page already here is a copy from its cache), and each
//! clone's fault handler subscribes to it, so every page that arrives —
//! whoever asked for it, or pushed — is installed into every local clone
//! at once (UFFDIO_COPY; a page already there is left alone). The push
//! replaces the per-clone prefetch thread. When the family ends the
//! receiver is closed (cache dropped) and the server frees the group.
//!
//! Across hosts the family envelope carries the endpoint (and the key it
//! already carries); each clone host starts its own receiver the same way
//! (`fork::hosted`), and the parent's host starts the push once every
//! party has joined: this host's launcher after subscribing its clones,
//! the remote sender once every clone host has answered its envelope
//! ([`FamilyMulticast::arrive`]).

use crate::fork::ForkError;
use memserver::mcdist::host::{local_ip_for, HostConfig, HostReceiver, HostStats};
use memserver::mcdist::McEndpoint;
use memserver::FamilyKey;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How a family's pages go out to its clones.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Each clone pulls its pages by unicast (one copy per clone).
    #[default]
    Unicast,
    /// Replies go to the family's multicast group; one receiver per host.
    Multicast,
}

impl std::fmt::Display for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Distribution::Unicast => "unicast",
            Distribution::Multicast => "multicast",
        })
    }
}

/// A host receiver's figures as reports show them (and as clone hosts
/// send them to the parent's host).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiverFigures {
    /// Pages asked for again after a timeout (loss repair).
    pub re_requests: u64,
    pub pages_arrived: u64,
    pub pages_pushed: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub gave_up: u64,
    /// Frames rejected: bad MAC, replayed, another session's.
    pub forged: u64,
    pub replayed: u64,
    pub foreign: u64,
}

impl From<&HostStats> for ReceiverFigures {
    fn from(s: &HostStats) -> ReceiverFigures {
        ReceiverFigures {
            re_requests: s.receiver.rerequests,
            pages_arrived: s.pages_arrived,
            pages_pushed: s.pages_pushed,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            gave_up: s.gave_up,
            forged: s.receiver.forged,
            replayed: s.receiver.replayed,
            foreign: s.receiver.foreign,
        }
    }
}

/// A family's multicast side on the parent's host.
pub struct FamilyMulticast {
    pub endpoint: McEndpoint,
    /// This host's receiver, from the clones' launch on (closed at the
    /// family's end; its counters outlive that).
    receiver: Mutex<Option<Arc<HostReceiver>>>,
    /// Parties still to join before the push starts.
    parties: AtomicUsize,
}

impl FamilyMulticast {
    /// `parties`: who must [`FamilyMulticast::arrive`] before the push.
    pub fn new(endpoint: McEndpoint, parties: usize) -> FamilyMulticast {
        FamilyMulticast {
            endpoint,
            receiver: Mutex::new(None),
            parties: AtomicUsize::new(parties.max(1)),
        }
    }

    /// One party has joined (or given up); true for the last one, which
    /// starts the push.
    pub fn arrive(&self) -> bool {
        self.parties
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            == Ok(1)
    }

    /// Joins the family's group on this host (`server`: the memory server
    /// whose interface the group is on).
    pub fn start_receiver(
        &self,
        key: &FamilyKey,
        pages: u64,
        server: SocketAddr,
    ) -> Result<Arc<HostReceiver>, ForkError> {
        let cfg = HostConfig::on(local_ip_for(server));
        let r = Arc::new(
            HostReceiver::start(self.endpoint, key, pages, cfg).map_err(ForkError::Multicast)?,
        );
        *crate::sync::lock(&self.receiver) = Some(r.clone());
        Ok(r)
    }

    /// The family has ended: closes the receiver (its cache goes).
    pub fn close(&self) {
        if let Some(r) = &*crate::sync::lock(&self.receiver) {
            r.close();
        }
    }

    /// The receiver's counters (live, or at the family's end).
    pub fn stats(&self) -> Option<HostStats> {
        crate::sync::lock(&self.receiver)
            .as_ref()
            .map(|r| r.stats())
    }
}
