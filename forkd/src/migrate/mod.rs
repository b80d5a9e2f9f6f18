//! Live migration of a running VM to another host: pre-copy with a
//! transactional commit (Clark et al., NSDI'05), post-copy, or auto
//! (pre-copy, switching to post-copy when it cannot converge).
//!
//! The source ([`sender`]) and the destination ([`receiver`]) speak the
//! framed, typed, versioned protocol of [`protocol`] over one TCP
//! connection; [`converge`] decides when pre-copy stops; [`postcopy`]
//! serves the rest of memory after the commit (its own diagram). The destination
//! daemon hands out a port and a one-time secret (the API does that, daemon
//! to daemon with the cluster's bearer token); the source connects and
//! presents the secret in its `Hello`.
//!
//! ```text
//!  source (sender)                               destination (receiver)
//!  ---------------                               ----------------------
//!  Connect ──TCP──────────────────────────────▶ Accept (bounded wait; a bad
//!  Handshake  ──Hello{secret, size}──────────▶   peer is refused, accept goes on)
//!             ◀────────────────────Welcome────  Handshake (memory, VmShell made)
//!  Round 0: dirty log on, populated non-zero
//!           pages ──Pages…, RoundEnd──────────▶ Receiving (pages written)
//!             ◀──────────────RoundAck{0}──────  (all of the round is here)
//!  Round n: the dirty set ──Pages…, RoundEnd─▶
//!             ◀──────────────RoundAck{n}──────
//!  (converge: estimate ≤ budget | stalled | round limit)
//!  (postcopy, or auto not converged: Switch — pause, serve the rest from
//!   the memory server, Postcopy{server, key, needed} instead of pages)
//!  StopAndCopy: pause, last dirty set, console,
//!    VmState ──Pages…, Console, State────────▶ Building (VmShell::build;
//!             ◀──────────────────────Ready────   vCPUs not started)
//!  Committing ──Commit────────────────────────▶ AwaitCommit → start, register
//!             ◀──────────Committed{vm}────────  Committed (guest runs here)
//!  Committed: the source's VM is destroyed
//!  (post-copy: Postcopy phase until ◀──PostcopyDone──, then Committed)
//!
//!  Any failure before Commit is sent (connection cut, destination dead,
//!  malformed message, Abort, timeout): Aborted — the source stops the dirty
//!  log and resumes its guest as if nothing happened; the destination drops
//!  what it built. Commit sent but no answer: InDoubt — the source keeps the
//!  guest paused and its caller asks the destination (which decides
//!  atomically, see [`receiver::CommitGate`]) whether it committed.
//! ```
//!
//! After commit the source never runs the guest again: the VM is never
//! resumed once `Commit` has left, unless the destination says it aborted.

pub mod converge;
pub mod postcopy;
pub mod protocol;
pub mod receiver;
pub mod sender;

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use converge::StopReason;
pub use postcopy::PostcopyReport;

/// Which way memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Copy rounds while the guest runs, then a short stop-and-copy.
    #[default]
    Precopy,
    /// Stop at once, resume on the destination, fetch memory after.
    Postcopy,
    /// Pre-copy; switch to post-copy if pre-copy cannot converge.
    Auto,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "precopy" => Some(Mode::Precopy),
            "postcopy" => Some(Mode::Postcopy),
            "auto" => Some(Mode::Auto),
            _ => None,
        }
    }
}

/// How a migration is run.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub mode: Mode,
    /// The downtime budget of the convergence rule.
    pub downtime: Duration,
    /// Bandwidth cap in MiB/s, 0 for none.
    pub bandwidth_mib_s: u64,
    /// Pre-copy rounds at most (round 0 included).
    pub max_rounds: u32,
    /// Longest wait for the peer on any one read or write.
    pub io_timeout: Duration,
    /// A clone: the pages not populated here are not zero but its fork
    /// family's (the destination faults them from the family's memory
    /// server), so round 0 sends populated zero pages too (as `Zeros`),
    /// and `auto` never switches to post-copy.
    pub family_backed: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            mode: Mode::Precopy,
            downtime: Duration::from_millis(30),
            bandwidth_mib_s: 0,
            max_rounds: 30,
            io_timeout: Duration::from_secs(5),
            family_backed: false,
        }
    }
}

/// Where a migration is in its state machine (the sender's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connecting,
    Precopy,
    StopAndCopy,
    Committing,
    /// Committed: the guest runs on the destination, which still fetches
    /// pages from here.
    Postcopy,
    Committed,
    Aborted,
    InDoubt,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Connecting,
            1 => Phase::Precopy,
            2 => Phase::StopAndCopy,
            3 => Phase::Committing,
            4 => Phase::Postcopy,
            5 => Phase::Committed,
            6 => Phase::Aborted,
            _ => Phase::InDoubt,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Committed | Phase::Aborted | Phase::InDoubt)
    }
}

/// Live figures of a running migration, updated by the sender, read by
/// anyone (atomics: no lock is held while the sender works).
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    round: AtomicU32,
    bytes_sent: AtomicU64,
    pages_sent: AtomicU64,
    dirty_pages: AtomicU64,
    dirty_pages_per_s: AtomicU64,
    estimated_downtime_us: AtomicU64,
    postcopy_left: AtomicU64,
    /// Asked to stop before commit (`DELETE /v1/vms/{id}/migration`).
    cancel: AtomicBool,
    report: Mutex<Option<Report>>,
    error: Mutex<Option<String>>,
}

/// A snapshot of [`Progress`].
#[derive(Debug, Clone, Serialize)]
pub struct ProgressView {
    pub phase: Phase,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub dirty_pages: u64,
    pub dirty_pages_per_s: u64,
    pub estimated_downtime_us: u64,
    /// Post-copy: pages the destination still has to fetch from here.
    pub postcopy_pages_left: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Progress {
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Asks the sender to abort; it does at its next frame, unless the
    /// commit has been sent already.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    fn sent(&self, pages: u64, bytes: u64) {
        self.pages_sent.fetch_add(pages, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    fn round(&self, round: u32, dirty: u64, per_s: u64, estimate: Duration) {
        self.round.store(round, Ordering::Relaxed);
        self.dirty_pages.store(dirty, Ordering::Relaxed);
        self.dirty_pages_per_s.store(per_s, Ordering::Relaxed);
        self.estimated_downtime_us.store(
            u64::try_from(estimate.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn postcopy_left(&self, left: u64) {
        self.postcopy_left.store(left, Ordering::Relaxed);
    }

    pub fn finish(&self, phase: Phase, report: Option<Report>, error: Option<String>) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = report;
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = error;
        self.set_phase(phase);
    }

    pub fn view(&self) -> ProgressView {
        ProgressView {
            phase: self.phase(),
            round: self.round.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            pages_sent: self.pages_sent.load(Ordering::Relaxed),
            dirty_pages: self.dirty_pages.load(Ordering::Relaxed),
            dirty_pages_per_s: self.dirty_pages_per_s.load(Ordering::Relaxed),
            estimated_downtime_us: self.estimated_downtime_us.load(Ordering::Relaxed),
            postcopy_pages_left: self.postcopy_left.load(Ordering::Relaxed),
            report: self
                .report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            error: self.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// What a committed migration took. Downtime is the source's view: from
/// the pause to the destination's acknowledgement.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Pre-copy rounds (round 0, the full copy, included).
    pub rounds: u32,
    pub stop_reason: StopReason,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages in the final (stop-and-copy) dirty set; in post-copy 0 (they
    /// are fetched after resuming: `postcopy.pages_needed`).
    pub last_round_pages: u64,
    pub total_us: u64,
    pub downtime_us: u64,
    /// Pausing the vCPUs.
    pub pause_us: u64,
    /// Handing the last dirty set to the connection.
    pub last_round_us: u64,
    /// Capturing and sending the state until the destination had built the
    /// VM: includes the destination draining the last pages still in flight.
    pub state_us: u64,
    /// Commit until the destination's acknowledgement (its vCPUs started).
    pub resume_us: u64,
    /// Measured throughput of the page copy.
    pub bandwidth_mib_s: f64,
    /// The VM's id on the destination.
    pub destination_vm: String,
    pub mode: Mode,
    /// Post-copy (mode `postcopy`, or `auto` when pre-copy did not
    /// converge): what the destination fetched after resuming.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
