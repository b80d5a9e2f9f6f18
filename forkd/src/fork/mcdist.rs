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
//! Across hosts (to come) the descriptor envelope carries the endpoint and
//! the family key; each clone host starts its own receiver the same way
//! and the parent's host starts the push once every host has joined.

use crate::fork::ForkError;
use memserver::mcdist::host::{local_ip_for, HostConfig, HostReceiver, HostStats};
use memserver::mcdist::McEndpoint;
use memserver::FamilyKey;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// How a family's pages go out to its clones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
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

/// A family's multicast side on the parent's host.
pub struct FamilyMulticast {
    pub endpoint: McEndpoint,
    /// This host's receiver, from the clones' launch to the family's end.
    receiver: Mutex<Option<Arc<HostReceiver>>>,
    /// Its counters when the family ended.
    last: Mutex<Option<HostStats>>,
}

impl FamilyMulticast {
    pub fn new(endpoint: McEndpoint) -> FamilyMulticast {
        FamilyMulticast {
            endpoint,
            receiver: Mutex::new(None),
            last: Mutex::new(None),
        }
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
        if let Some(r) = crate::sync::lock(&self.receiver).take() {
            r.close();
            *crate::sync::lock(&self.last) = Some(r.stats());
        }
    }

    /// The receiver's counters (live, or at the family's end).
    pub fn stats(&self) -> Option<HostStats> {
        match &*crate::sync::lock(&self.receiver) {
            Some(r) => Some(r.stats()),
            None => *crate::sync::lock(&self.last),
        }
    }
}
