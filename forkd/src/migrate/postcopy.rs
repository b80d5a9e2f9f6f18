//! Post-copy: the guest resumes on the destination before all of its
//! memory has arrived, and the rest comes through the fork path's parts —
//! the source's memory server serves the paused guest's memory as a
//! family, the destination's memory is registered with userfaultfd, its
//! fault handler fetches what the guest touches, and a prefetcher pulls
//! every other needed page in the background (SnowFlock's push, pulled).
//!
//! ```text
//!  source                                        destination
//!  pause; needed = dirty set (auto) or every
//!  populated page (postcopy); serve the paused
//!  memory as a family of the memory server
//!  ──Console, Postcopy{server, key, needed}, State──▶ discard needed pages,
//!                                                register uffd, fault
//!             ◀────────────────────Ready────      handler + prefetcher
//!  ──Commit──────────────────────────────────▶   start the guest
//!             ◀──────────Committed{vm}────────
//!  (source VM destroyed; memory kept)   faults ──UDP──▶ memory server
//!             ◀──PostcopyProgress{left}… ─────   every 100 ms
//!             ◀──PostcopyDone────────────────    every needed page here
//!  family removed, memory freed
//! ```
//!
//! The window — commit until `PostcopyDone` — is post-copy's weak point:
//! the guest's only copy of the missing pages is on the source. If the
//! source dies inside it, the destination's faults go unanswered, its fault
//! handler gives up (the page client's ~8 s of re-requests) and the guest
//! there fails with that error: the guest is lost. Pre-copy never has this
//! window; `auto` only enters it when pre-copy cannot converge.

use super::protocol::{self, Message, PostcopyOffer, ProtocolError};
use super::{micros, Progress};
use crate::fork::fault::UffdError;
use crate::fork::fault::{CloneMemory, FaultHandler, FaultHandlerConfig, FaultStatsView, Prefetch};
use crate::vmm::dirty::{self, PageBitmap, PageRange, PAGE_SIZE};
use crate::vmm::memory::{self, GuestMemory};
use memserver::client::{ClientOptions, PageClient};
use memserver::server::MemServer;
use memserver::{FamilyKey, PageSource, SourceError};
use serde::Serialize;
use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// How often the destination reports the pages still missing, and looks.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
const LOOK_EVERY: Duration = Duration::from_millis(2);
/// The destination calls post-copy failed when no needed page arrived for
/// this long (the page client gives up on a silent server after ~8 s).
const STALL: Duration = Duration::from_secs(20);
/// Source: after losing the destination's connection, the family is kept
/// until it has had no request for this long.
const IDLE_GRACE: Duration = Duration::from_secs(10);
/// Read-ahead of the destination's demand faults (pages).
const READAHEAD: u64 = 32;

/// What post-copy took, in the source's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyReport {
    /// Pages the destination had to fetch after resuming.
    pub pages_needed: u64,
    /// Commit acknowledged until the destination had every needed page:
    /// how long the guest depended on the source.
    pub window_us: u64,
    /// Pages the destination's guest faulted for / the prefetcher pulled.
    pub pages_faulted: u64,
    pub pages_prefetched: u64,
    /// Requests and pages the source's memory server served for it.
    pub requests_served: u64,
    pub pages_served: u64,
    /// Why the window did not end with every page delivered, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("post-copy needs this host's memory server, and there is none")]
    NoServer,
    #[error("serving the paused guest's memory: {0}")]
    Serve(String),
    #[error("the destination's memory cannot be prepared: {0}")]
    Prepare(String),
    #[error("the needed-page bitmap has {got} words for a guest of {pages} pages")]
    BadNeeded { got: usize, pages: u64 },
}

/// The paused source guest's memory as a page source. The guest never
/// runs again once it is served, so its pages are final.
struct PausedMemory {
    memory: GuestMemory,
    pages: u64,
}

impl PageSource for PausedMemory {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, index: u64, buf: &mut [u8; 4096]) -> Result<(), SourceError> {
        if index >= self.pages {
            return Err(SourceError::OutOfRange {
                index,
                pages: self.pages,
            });
        }
        self.memory
            .read_slice(buf, GuestAddress(index * PAGE_SIZE))
            .map_err(|e| SourceError::Unavailable(format!("guest memory: {e}")))
    }
}

/// The source's side: the paused guest's memory served as a family of
/// the memory server until dropped.
pub struct Serving {
    server: Arc<MemServer>,
    key: FamilyKey,
    /// Pages the destination has to fetch.
    pub needed: u64,
}

impl Serving {
    /// Serves `memory` (of a paused guest that never runs again: the
    /// mapping is kept alive by this even after its VM is gone).
    pub fn start(
        server: &Arc<MemServer>,
        memory: &GuestMemory,
        needed: &PageBitmap,
    ) -> Result<(Serving, PostcopyOffer), PostcopyError> {
        let pages = (memory_len(memory)) / PAGE_SIZE;
        let source = Arc::new(PausedMemory {
            memory: memory.clone(),
            pages,
        });
        let key = server
            .add_family(source)
            .map_err(|e| PostcopyError::Serve(e.to_string()))?;
        let offer = PostcopyOffer {
            server: server.local_addr(),
            family: key.id(),
            secret: *key.secret(),
            needed: needed.as_raw_slice().to_vec(),
        };
        let serving = Serving {
            server: server.clone(),
            key,
            needed: needed.count_ones() as u64,
        };
        Ok((serving, offer))
    }

    /// Keeps serving in the background until nobody has asked for a
    /// while (a commit in doubt: the destination may run the guest).
    pub fn linger(self) {
        let spawned = std::thread::Builder::new()
            .name("postcopy-linger".into())
            .spawn(move || serve_while_asked(&self));
        if let Err(e) = spawned {
            tracing::warn!("post-copy pages no longer served after a commit in doubt: {e}");
        }
    }

    /// (requests, pages) the server has served this family so far.
    fn served(&self) -> (u64, u64) {
        self.server
            .stats()
            .families
            .iter()
            .find(|f| f.family == self.key.id())
            .map(|f| (f.requests, f.pages_sent))
            .unwrap_or_default()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.server.remove_family(self.key.id());
    }
}

fn memory_len(m: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend;
    m.last_addr().0 + 1
}

/// The source after commit: waits for the destination to have every page,
/// then stops serving. Returned by the sender with its report.
pub struct Tail {
    pub(super) stream: TcpStream,
    pub(super) serving: Serving,
    pub(super) committed: Instant,
    pub(super) io_timeout: Duration,
}

impl Tail {
    /// Serves until the destination has every needed page (or fails, or
    /// is lost and stops asking); updates `progress` as it reports. Holds
    /// no lock while it waits.
    pub fn finish(mut self, progress: &Progress) -> PostcopyReport {
        let mut report = PostcopyReport {
            pages_needed: self.serving.needed,
            ..PostcopyReport::default()
        };
        let _ = self.stream.set_read_timeout(Some(self.io_timeout));
        let error = loop {
            match protocol::read_message(&mut self.stream) {
                Ok(Message::PostcopyProgress { left }) => progress.postcopy_left(left),
                Ok(Message::PostcopyDone {
                    faulted,
                    prefetched,
                }) => {
                    report.pages_faulted = faulted;
                    report.pages_prefetched = prefetched;
                    progress.postcopy_left(0);
                    break None;
                }
                Ok(Message::PostcopyFailed { reason }) => {
                    break Some(format!(
                        "the destination could not fetch the rest: {reason}"
                    ))
                }
                Ok(other) => break Some(format!("unexpected {} in post-copy", other.kind())),
                Err(e) => {
                    // The destination may still be fetching: serve on
                    // until it has stopped asking.
                    serve_while_asked(&self.serving);
                    break Some(format!("lost the destination's reports: {e}"));
                }
            }
        };
        report.window_us = micros(self.committed.elapsed());
        (report.requests_served, report.pages_served) = self.serving.served();
        report.error = error;
        report
    }
}

/// Returns once `serving` has had no request for [`IDLE_GRACE`].
fn serve_while_asked(serving: &Serving) {
    let mut last = serving.served().0;
    let mut since = Instant::now();
    while since.elapsed() < IDLE_GRACE {
        std::thread::sleep(Duration::from_millis(250));
        let now = serving.served().0;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// The destination's side, before its guest starts: what it must fetch.
pub struct Arrival {
    memory: Arc<CloneMemory>,
    needed: Vec<PageRange>,
    faults: FaultStatsView,
    error: Arc<Mutex<Option<String>>>,
}

/// Prepares the destination's memory for post-copy: the needed pages (any
/// stale copy of them that pre-copy sent) are dropped, the memory is
/// registered with userfaultfd, and a fault handler with a prefetcher is
/// made, to become the VM's memory server. `have`: the pages pre-copy
/// wrote here.
pub fn arrive(
    memory: &GuestMemory,
    offer: &PostcopyOffer,
    have: &PageBitmap,
    name: &str,
) -> Result<(FaultHandler, Arrival), PostcopyError> {
    let pages = memory_len(memory) / PAGE_SIZE;
    if offer.needed.len() as u64 != pages.div_ceil(64) {
        return Err(PostcopyError::BadNeeded {
            got: offer.needed.len(),
            pages,
        });
    }
    let prep = |e: &dyn std::fmt::Display| PostcopyError::Prepare(e.to_string());
    let needed_bits = dirty::from_kvm_words(&offer.needed, pages as usize);
    let needed = dirty::ranges(&needed_bits);
    // Stale copies pre-copy sent of pages dirtied since (in pure
    // post-copy nothing was sent: no call at all).
    let mut stale = needed_bits.clone();
    stale &= have;
    for r in dirty::ranges(&stale) {
        memory::discard(memory, r.first, r.count).map_err(|e| prep(&e))?;
    }
    let cmem = Arc::new(CloneMemory::register(memory).map_err(|e: UffdError| prep(&e))?);
    let mut present = needed_bits.clone();
    present = !present;
    present &= have;
    cmem.presence.set_all(&present);
    let key = FamilyKey::from_parts(offer.family, offer.secret);
    let client = || {
        PageClient::with_pages(offer.server, key.clone(), pages, ClientOptions::default())
            .map(|c| Arc::new(c) as Arc<dyn PageSource>)
            .map_err(|e| prep(&e))
    };
    let mut zero = needed_bits;
    zero = !zero;
    let handler = FaultHandler::spawn(
        FaultHandlerConfig {
            memory: cmem.clone(),
            source: client()?,
            avoidance: None,
            known_zero: Some(Arc::new(zero)),
            readahead: READAHEAD,
            prefetch: Some(Prefetch {
                source: client()?,
                ranges: needed.iter().map(|r| (r.first, r.count)).collect(),
            }),
            feed: None,
        },
        name,
    )
    .map_err(|e| prep(&e))?;
    let arrival = Arrival {
        memory: cmem,
        needed,
        faults: handler.stats_view(),
        error: handler.error_slot(),
    };
    Ok((handler, arrival))
}

/// What the destination's post-copy ended with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrived {
    pub window: Duration,
    pub faulted: u64,
    pub prefetched: u64,
}

impl Arrival {
    /// Pages the destination has to fetch.
    pub fn needed(&self) -> u64 {
        self.needed.iter().map(|r| r.count).sum()
    }

    /// After commit: reports to the source until every needed page is
    /// here (`PostcopyDone`) or fetching has failed (`PostcopyFailed`;
    /// the guest here then fails with the fault handler's error).
    /// `progress` gets the pages left as they go.
    pub fn wait(&self, writer: &mut TcpStream, progress: &dyn Fn(u64)) -> Result<Arrived, String> {
        let started = Instant::now();
        let (mut best, mut moved) = (u64::MAX, Instant::now());
        let mut reported: Option<Instant> = None;
        // The needed pages still missing; each look keeps only those, so
        // it costs what is left, not the whole needed set.
        let mut missing: Vec<u64> = self
            .needed
            .iter()
            .flat_map(|r| r.first..r.first + r.count)
            .collect();
        let mut send = |m: &Message| {
            // A lost report does not stop the pages (they come by UDP).
            if let Err(e) = protocol::write_message(writer, m)
                .and_then(|_| writer.flush().map_err(ProtocolError::from))
            {
                tracing::debug!("post-copy report not delivered: {e}");
            }
        };
        loop {
            missing.retain(|p| !self.memory.presence.test(*p));
            let left = missing.len() as u64;
            progress(left);
            if left == 0 {
                let f = self.faults.get();
                let done = Arrived {
                    window: started.elapsed(),
                    faulted: f.pages_fetched,
                    prefetched: f.pages_prefetched,
                };
                send(&Message::PostcopyDone {
                    faulted: done.faulted,
                    prefetched: done.prefetched,
                });
                return Ok(done);
            }
            let failed = crate::sync::lock(&self.error).clone();
            if left < best {
                (best, moved) = (left, Instant::now());
            }
            let why = failed.or_else(|| {
                (moved.elapsed() > STALL).then(|| format!("no page arrived for {STALL:?}"))
            });
            if let Some(reason) = why {
                send(&Message::PostcopyFailed {
                    reason: reason.clone(),
                });
                return Err(reason);
            }
            if reported.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                send(&Message::PostcopyProgress { left });
                reported = Some(Instant::now());
            }
            std::thread::sleep(LOOK_EVERY);
        }
    }
}
