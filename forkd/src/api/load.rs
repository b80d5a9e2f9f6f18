//! Load, measured, for the policy engine's information policy: per VM
//! (vCPU time per second, resident guest memory) and per host (the
//! daemon's CPU per second — its vCPU threads, fault handlers and memory
//! server; its resident memory; the machine's memory; VM count), sampled
//! by the reaper once a second; and the daemon's counters. Served as JSON
//! (`GET /v1/host`, and `load` in `GET /v1/vms/{id}`) and as Prometheus
//! text (`GET /metrics`, [`super::metrics`]).

use serde::Serialize;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;
use crate::vmm::{memory, Vm};

/// How often loads are sampled.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A VM's load, as last sampled.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VmLoad {
    /// vCPU time per second over the last sample (cores).
    pub cpu_cores: f64,
    /// vCPU time so far.
    pub cpu_seconds: f64,
    /// Guest memory resident on this host.
    pub resident_bytes: u64,
    /// Client updates for this VM (`api::updates`), once any came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<crate::clients::ClientCounters>,
    /// The guest's own tick load, from its agent page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::clients::GuestLoad>,
}

/// The last CPU-time sample, and the rate since the one before.
#[derive(Debug, Default, Clone, Copy)]
struct CpuRate(Option<(Instant, Duration)>);

impl CpuRate {
    /// Whether a new sample is due at `now`.
    fn due(&self, now: Instant) -> bool {
        self.0
            .is_none_or(|(t, _)| now.duration_since(t) >= SAMPLE_EVERY)
    }

    fn sampled(&self) -> bool {
        self.0.is_some()
    }

    /// Records `cpu` at `now`; the cores used since the last sample, if
    /// there was one.
    fn update(&mut self, now: Instant, cpu: Duration) -> Option<f64> {
        let rate = self.0.map(|(t, before)| {
            let dt = now.duration_since(t).as_secs_f64().max(1e-3);
            cpu.saturating_sub(before).as_secs_f64() / dt
        });
        self.0 = Some((now, cpu));
        rate
    }
}

/// One VM's sampler.
#[derive(Debug, Default)]
pub(super) struct VmSampler {
    state: Mutex<(CpuRate, VmLoad)>,
}

impl VmSampler {
    /// Samples `vm` if the last sample is [`SAMPLE_EVERY`] old.
    pub(super) fn sample(&self, vm: &Vm) {
        let mut g = lock(&self.state);
        let now = Instant::now();
        if !g.0.due(now) {
            return;
        }
        let cpu = vm.cpu_time();
        if let Some(cores) = g.0.update(now, cpu) {
            g.1.cpu_cores = cores;
        }
        g.1.cpu_seconds = cpu.as_secs_f64();
        g.1.resident_bytes = memory::resident_bytes(vm.memory()).unwrap_or(0);
    }

    /// An ended VM uses no CPU.
    pub(super) fn ended(&self) {
        lock(&self.state).1.cpu_cores = 0.0;
    }

    pub(super) fn get(&self) -> Option<VmLoad> {
        let g = lock(&self.state);
        g.0.sampled().then_some(g.1)
    }
}

/// `GET /v1/host`: this host's load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostLoadInfo {
    pub name: String,
    /// CPU the host offers (cores): the machine's online CPUs.
    pub capacity_cores: f64,
    /// The daemon's CPU per second over the last sample (cores).
    pub cpu_cores: f64,
    pub cpu_seconds: f64,
    /// The daemon's resident memory.
    pub resident_bytes: u64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// VMs registered (exited ones included) and hosted clones running.
    pub vms: u64,
    pub hosted_clones: u64,
}

/// The daemon's own sampler.
#[derive(Debug, Default)]
pub(super) struct HostSampler {
    state: Mutex<(CpuRate, HostLoadInfo)>,
}

impl HostSampler {
    pub(super) fn sample(&self) {
        let mut g = lock(&self.state);
        let now = Instant::now();
        if !g.0.due(now) {
            return;
        }
        let cpu = process_cpu();
        if let Some(cores) = g.0.update(now, cpu) {
            g.1.cpu_cores = cores;
        }
        g.1.cpu_seconds = cpu.as_secs_f64();
        g.1.capacity_cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        g.1.resident_bytes = process_rss().unwrap_or(0);
        let (total, avail) = meminfo().unwrap_or_default();
        g.1.mem_total_bytes = total;
        g.1.mem_available_bytes = avail;
    }

    /// The last sample (taken now if there is none yet).
    pub(super) fn get(&self) -> HostLoadInfo {
        if !lock(&self.state).0.sampled() {
            self.sample();
        }
        lock(&self.state).1.clone()
    }
}

/// Migrations out of this host since the daemon started (forks are
/// counted by the hubs: `fork::family::ForkCounters`).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) migrations_committed: AtomicU64,
    pub(super) migrations_aborted: AtomicU64,
    pub(super) migrations_in_doubt: AtomicU64,
    pub(super) migration_bytes: AtomicU64,
}

/// CPU time of this process (all its threads).
fn process_cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid out pointer for one rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage succeeded and filled it.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Resident set of this process (`/proc/self/statm`, pages).
fn process_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// MemTotal and MemAvailable, bytes.
fn meminfo() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_figures_are_read() {
        let h = HostSampler::default();
        h.sample();
        let g = h.get();
        assert!(g.capacity_cores >= 1.0);
        assert!(g.resident_bytes > 0 && g.mem_total_bytes >= g.mem_available_bytes);
        assert!(g.cpu_seconds > 0.0);
    }
}
