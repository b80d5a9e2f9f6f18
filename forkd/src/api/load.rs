//! Load, measured, for the policy engine's information policy: per VM
//! (vCPU time per second, resident guest memory, pages dirtied per second,
//! userfaultfd faults per second — its own and its clones') and per host (the
//! daemon's CPU per second — its vCPU threads, fault handlers and memory
//! server; its resident memory; the machine's memory; VM count), sampled
//! by the reaper once a second; and the daemon's counters. Served as JSON
//! (`GET /v1/host`, and `load` in `GET /v1/vms/{id}`) and as Prometheus
//! text (`GET /metrics`, [`super::metrics`]).
//!
//! The dirty rate is sampled, not tracked: every [`DirtySampling::every`]
//! the reaper opens a window of KVM's dirty log on the VM
//! ([`Vm::open_dirty_window`]) and closes it [`DirtySampling::window`]
//! later (a later pass: the reaper never waits for it), counting the
//! distinct pages written. While the log watches a page, the guest's first
//! write to it traps (shadow paging here), so the log is off between
//! windows, and a window watches one page in [`DirtySampling::one_in`]
//! (where KVM has manual dirty-log protection) and scales the count up.
//! Measured (tests/tests/dirty_window.rs, a loaded 2-core machine): a
//! window watching every page cost a zone rewriting its 32 MiB state
//! ~0.23–0.7 s of vCPU time; watching one page in 8, ~0.08 s (a paced
//! zone: 0.17–0.45 s, and nothing measurable). Hence the default: a 1 s window every 10 s, one page in 8. A
//! migration owns the log: the VM is out of its entry then (the sampler
//! cannot reach it), an open window is dropped when the migration takes
//! the VM ([`VmSampler::drop_window`]), and the vmm layer never opens a
//! window while tracking is on.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;
use crate::vmm::dirty::LogUse;
use crate::vmm::{memory, Vm};

/// How often loads are sampled.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Dirty-rate sampling (`forkd serve --dirty-sample-every-ms`,
/// `--dirty-window-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtySampling {
    /// A window opens this often; `None`: no dirty-rate sampling.
    pub every: Option<Duration>,
    /// How long a window stays open.
    pub window: Duration,
    /// A window watches one page in this many (where KVM has manual
    /// dirty-log protection; every page otherwise): fewer write traps.
    pub one_in: u32,
}

impl Default for DirtySampling {
    fn default() -> Self {
        DirtySampling {
            every: Some(Duration::from_secs(10)),
            window: Duration::from_secs(1),
            one_in: 8,
        }
    }
}

/// A VM's load, as last sampled.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VmLoad {
    /// vCPU time per second over the last sample (cores).
    pub cpu_cores: f64,
    /// vCPU time so far.
    pub cpu_seconds: f64,
    /// Guest memory resident on this host.
    pub resident_bytes: u64,
    /// Distinct pages dirtied per second over the last dirty-rate window
    /// (`None`: not measured yet, or sampling is off).
    pub dirty_pages_per_s: Option<f64>,
    /// Faults per second its own userfaultfd handler served (a VM that
    /// arrived by post-copy while it fetches; 0 for others).
    pub faults_per_s: f64,
    /// Faults per second of the clones of its fork families (on this host
    /// and, as their hosts report them, elsewhere).
    pub clone_faults_per_s: f64,
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

/// CPU rates by key (a VM's clones, a host's hosted clones): a key first
/// seen has a rate from its second sample on; a key no longer listed (the
/// clone ended or moved) is dropped.
#[derive(Debug)]
pub(super) struct CpuRates<K>(BTreeMap<K, (CpuRate, Option<f64>)>);

impl<K> Default for CpuRates<K> {
    fn default() -> Self {
        CpuRates(BTreeMap::new())
    }
}

impl<K: Ord> CpuRates<K> {
    fn update(&mut self, now: Instant, times: Vec<(K, Duration)>) {
        let mut prev = std::mem::take(&mut self.0);
        for (k, t) in times {
            let (mut c, last) = prev.remove(&k).unwrap_or_default();
            let r = c.update(now, t).or(last);
            self.0.insert(k, (c, r));
        }
    }

    /// The keys sampled twice or more, and their last rates (cores).
    fn rates(&self) -> impl Iterator<Item = (&K, f64)> {
        self.0.iter().filter_map(|(k, (_, r))| r.map(|r| (k, r)))
    }
}

/// A counter's rate per second between two samples (a counter that went
/// down — a family forgotten — counts from its new value).
#[derive(Debug, Default, Clone, Copy)]
struct CountRate(Option<(Instant, u64)>);

impl CountRate {
    fn update(&mut self, now: Instant, n: u64) -> Option<f64> {
        let rate = self.0.map(|(t, before)| {
            let dt = now.duration_since(t).as_secs_f64().max(1e-3);
            n.saturating_sub(before) as f64 / dt
        });
        self.0 = Some((now, n));
        rate
    }
}

/// Each clone's rate from its counter now (`per_clone`), the previous
/// sample's (`prev`, taken at `before`): a clone first seen counts from 0
/// at the previous sample; a clone no longer listed is dropped.
fn clone_rates(
    mut prev: BTreeMap<CloneKey, (CountRate, f64)>,
    per_clone: Vec<(CloneKey, u64)>,
    before: Option<Instant>,
    now: Instant,
) -> BTreeMap<CloneKey, (CountRate, f64)> {
    let mut rates = BTreeMap::new();
    for (key, n) in per_clone {
        let (mut c, _) = prev
            .remove(&key)
            .unwrap_or((CountRate(before.map(|t| (t, 0))), 0.0));
        let r = c.update(now, n).unwrap_or(0.0);
        rates.insert(key, (c, r));
    }
    rates
}

/// What the dirty-rate sampler should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirtyStep {
    Nothing,
    Open,
    Close,
}

/// The dirty-rate schedule: `using` is who has the VM's log on, `last` when
/// this sampler last opened a window. Pure, for the tests.
fn dirty_step(
    cfg: &DirtySampling,
    using: LogUse,
    last: Option<Instant>,
    now: Instant,
) -> DirtyStep {
    match using {
        LogUse::Window(since) if now.duration_since(since) >= cfg.window => DirtyStep::Close,
        // A window of a sampler turned off meanwhile closes too.
        LogUse::Window(_) if cfg.every.is_none() => DirtyStep::Close,
        LogUse::Off => match cfg.every {
            Some(every) if last.is_none_or(|t| now.duration_since(t) >= every) => DirtyStep::Open,
            _ => DirtyStep::Nothing,
        },
        _ => DirtyStep::Nothing,
    }
}

#[derive(Debug, Default)]
struct VmSamples {
    cpu: CpuRate,
    faults: CountRate,
    clone_faults: CountRate,
    /// Each clone's fault rate (and the counter it came from).
    per_clone: BTreeMap<CloneKey, (CountRate, f64)>,
    /// Each of this host's clones' vCPU time per second.
    clone_cpu: CpuRates<CloneKey>,
    /// When this sampler last opened a dirty-rate window.
    window_opened: Option<Instant>,
    load: VmLoad,
}

/// One VM's sampler.
#[derive(Debug, Default)]
pub(super) struct VmSampler {
    state: Mutex<VmSamples>,
}

impl VmSampler {
    /// Samples `vm` if the last sample is [`SAMPLE_EVERY`] old
    /// (`clone_faults`: its clones' faults so far; `clone_cpu`: its clones
    /// on this host, their vCPU time so far), and opens or closes its
    /// dirty-rate window when due. Never waits: a window closes on a later
    /// call.
    pub(super) fn sample(
        &self,
        vm: &Vm,
        dirty: &DirtySampling,
        clone_faults: impl FnOnce() -> Vec<(CloneKey, u64)>,
        clone_cpu: impl FnOnce() -> Vec<(CloneKey, Duration)>,
    ) {
        let mut g = lock(&self.state);
        let now = Instant::now();
        // The first window waits for a first CPU sample (not at boot).
        if g.cpu.sampled() {
            self.dirty(&mut g, vm, dirty, now);
        }
        if !g.cpu.due(now) {
            return;
        }
        let cpu = vm.cpu_time();
        if let Some(cores) = g.cpu.update(now, cpu) {
            g.load.cpu_cores = cores;
        }
        g.load.cpu_seconds = cpu.as_secs_f64();
        g.clone_cpu.update(now, clone_cpu());
        g.load.resident_bytes = memory::resident_bytes(vm.memory()).unwrap_or(0);
        // Faults count from the VM's making (a post-copy arrival takes
        // most of its faults before a first sample could see them).
        if g.faults.0.is_none() {
            g.faults.0 = Some((vm.times.started, 0));
        }
        if let Some(r) = g.faults.update(now, vm.memory_faults().unwrap_or(0)) {
            g.load.faults_per_s = r;
        }
        let per_clone = clone_faults();
        let before = g.clone_faults.0.map(|(t, _)| t);
        let total = per_clone.iter().map(|(_, n)| n).sum();
        if let Some(r) = g.clone_faults.update(now, total) {
            g.load.clone_faults_per_s = r;
        }
        let prev = std::mem::take(&mut g.per_clone);
        g.per_clone = clone_rates(prev, per_clone, before, now);
    }

    fn dirty(&self, g: &mut VmSamples, vm: &Vm, cfg: &DirtySampling, now: Instant) {
        match dirty_step(cfg, vm.dirty_log_use(), g.window_opened, now) {
            DirtyStep::Nothing => {}
            DirtyStep::Open => {
                g.window_opened = Some(now);
                if vm.is_paused() {
                    return;
                }
                if let Err(e) = vm.open_dirty_window(cfg.one_in) {
                    tracing::warn!("dirty-rate window: {e}");
                }
            }
            DirtyStep::Close => match vm.close_dirty_window() {
                Ok(Some(w)) => g.load.dirty_pages_per_s = Some(w.pages_per_s()),
                Ok(None) => {}
                Err(e) => tracing::warn!("dirty-rate window: {e}"),
            },
        }
    }

    /// Drops an open window uncounted: a migration takes the VM (its
    /// tracking owns the log from now on), or a fork freezes it.
    pub(super) fn drop_window(&self, vm: &Vm) {
        let _g = lock(&self.state);
        if matches!(vm.dirty_log_use(), LogUse::Window(_)) {
            if let Err(e) = vm.close_dirty_window() {
                tracing::warn!("dirty-rate window: {e}");
            }
        }
    }

    /// An ended VM uses no CPU and dirties nothing.
    pub(super) fn ended(&self) {
        let mut g = lock(&self.state);
        g.load.cpu_cores = 0.0;
        g.load.faults_per_s = 0.0;
        if g.load.dirty_pages_per_s.is_some() {
            g.load.dirty_pages_per_s = Some(0.0);
        }
    }

    /// Each clone's faults per second over the last sample.
    pub(super) fn clone_rates(&self) -> BTreeMap<CloneKey, f64> {
        lock(&self.state)
            .per_clone
            .iter()
            .map(|(k, (_, r))| (*k, *r))
            .collect()
    }

    pub(super) fn get(&self) -> Option<VmLoad> {
        let g = lock(&self.state);
        g.cpu.sampled().then_some(g.load)
    }

    /// Its clones on this host (those sampled twice): each one's vCPU
    /// time per second, in clone order.
    pub(super) fn clone_cores(&self) -> Vec<f64> {
        lock(&self.state)
            .clone_cpu
            .rates()
            .map(|(_, r)| r)
            .collect()
    }
}

/// vCPU time so far of each running clone of `hub`'s families on this
/// host, by (family, clone id).
pub(super) fn clone_cpu(hub: &crate::fork::parent::ForkHub) -> Vec<(CloneKey, Duration)> {
    hub.families()
        .iter()
        .flat_map(|f| {
            let fam = f.id();
            f.guests()
                .cpu_times()
                .into_iter()
                .map(move |(c, t)| ((fam, c), t))
        })
        .collect()
}

/// A clone hosted here: its parent's host, its family and clone id.
pub(super) type HostedKey = (String, u64, u64);

/// Faults so far of each clone of `hub`'s families, by (family, clone id)
/// (this host's, and the other hosts' once they ended and reported).
pub(super) fn clone_faults(hub: &crate::fork::parent::ForkHub) -> Vec<(CloneKey, u64)> {
    hub.families()
        .iter()
        .flat_map(|f| {
            let fam = f.id();
            f.faults_by_clone()
                .into_iter()
                .map(move |(c, n)| ((fam, c), n))
        })
        .collect()
}

/// A clone: its family and clone id.
pub(super) type CloneKey = (u64, u64);

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
    /// Each hosted clone's vCPU time per second.
    hosted: Mutex<CpuRates<HostedKey>>,
}

impl HostSampler {
    /// Samples the host if the last sample is [`SAMPLE_EVERY`] old
    /// (`hosted`: the clones hosted here, their vCPU time so far).
    pub(super) fn sample(&self, hosted: impl FnOnce() -> Vec<(HostedKey, Duration)>) {
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
        drop(g);
        lock(&self.hosted).update(now, hosted());
    }

    /// The hosted clones sampled twice or more, and their vCPU time per
    /// second (cores).
    pub(super) fn hosted_cores(&self) -> Vec<(HostedKey, f64)> {
        lock(&self.hosted)
            .rates()
            .map(|(k, r)| (k.clone(), r))
            .collect()
    }

    /// Hosted clone `clone_id` of `family`: its last rate, once sampled
    /// twice.
    pub(super) fn hosted_core(&self, family: u64, clone_id: u64) -> Option<f64> {
        lock(&self.hosted)
            .rates()
            .find(|((_, f, c), _)| *f == family && *c == clone_id)
            .map(|(_, r)| r)
    }

    /// The last sample (taken now if there is none yet).
    pub(super) fn get(&self) -> HostLoadInfo {
        if !lock(&self.state).0.sampled() {
            self.sample(Vec::new);
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
    fn dirty_windows_open_every_period_and_close_after_the_window() {
        let cfg = DirtySampling {
            every: Some(Duration::from_secs(10)),
            window: Duration::from_secs(1),
            one_in: 8,
        };
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Never opened: open now.
        assert_eq!(dirty_step(&cfg, LogUse::Off, None, t0), DirtyStep::Open);
        // Open for less than the window: wait; then close.
        let w = LogUse::Window(t0);
        assert_eq!(dirty_step(&cfg, w, Some(t0), at(999)), DirtyStep::Nothing);
        assert_eq!(dirty_step(&cfg, w, Some(t0), at(1000)), DirtyStep::Close);
        // Closed: the next window one period after the last opened.
        assert_eq!(
            dirty_step(&cfg, LogUse::Off, Some(t0), at(9999)),
            DirtyStep::Nothing
        );
        assert_eq!(
            dirty_step(&cfg, LogUse::Off, Some(t0), at(10_000)),
            DirtyStep::Open
        );
        // A migration's tracking owns the log: never opened nor closed.
        assert_eq!(
            dirty_step(&cfg, LogUse::Tracking, Some(t0), at(60_000)),
            DirtyStep::Nothing
        );
        assert_eq!(
            dirty_step(&cfg, LogUse::Tracking, None, t0),
            DirtyStep::Nothing
        );
        // Off: nothing opens; a window left open closes at once.
        let off = DirtySampling { every: None, ..cfg };
        assert_eq!(dirty_step(&off, LogUse::Off, None, t0), DirtyStep::Nothing);
        assert_eq!(dirty_step(&off, w, Some(t0), at(10)), DirtyStep::Close);
    }

    #[test]
    fn counter_rates() {
        let t0 = Instant::now();
        let mut r = CountRate::default();
        assert_eq!(r.update(t0, 100), None);
        let v = r.update(t0 + Duration::from_millis(500), 600).unwrap();
        assert!((v - 1000.0).abs() < 1e-6, "{v}");
        // A counter that went down (a family forgotten) is no negative rate.
        assert_eq!(r.update(t0 + Duration::from_secs(1), 10), Some(0.0));
    }

    #[test]
    fn per_clone_rates() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let get = |m: &BTreeMap<CloneKey, (CountRate, f64)>| -> Vec<(CloneKey, f64)> {
            m.iter().map(|(k, (_, r))| (*k, *r)).collect()
        };
        // The first sample of a VM: no rate yet.
        let m = clone_rates(BTreeMap::new(), vec![((7, 1), 50)], None, t0);
        assert_eq!(get(&m), vec![((7, 1), 0.0)]);
        // A second later: clone 1 took 100 more; clone 2 appeared with 30
        // (counted from 0 at the last sample).
        let m = clone_rates(m, vec![((7, 1), 150), ((7, 2), 30)], Some(t0), at(1000));
        assert_eq!(get(&m), vec![((7, 1), 100.0), ((7, 2), 30.0)]);
        // Clone 1's family is forgotten: it goes.
        let m = clone_rates(m, vec![((7, 2), 30)], Some(at(1000)), at(2000));
        assert_eq!(get(&m), vec![((7, 2), 0.0)]);
    }

    #[test]
    fn per_key_cpu_rates() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        let get = |r: &CpuRates<u64>| -> Vec<(u64, f64)> {
            r.rates()
                .map(|(k, c)| (*k, (c * 1000.0).round() / 1000.0))
                .collect()
        };
        let mut r = CpuRates::default();
        // First seen: no rate yet.
        r.update(t0, vec![(1, ms(100))]);
        assert_eq!(get(&r), vec![]);
        // A second later: clone 1 ran 250 ms more; clone 2 is new.
        r.update(at(1000), vec![(1, ms(350)), (2, ms(40))]);
        assert_eq!(get(&r), vec![(1, 0.25)]);
        // Clone 1 ended (not listed): it goes; clone 2 has its rate.
        r.update(at(2000), vec![(2, ms(540))]);
        assert_eq!(get(&r), vec![(2, 0.5)]);
    }

    #[test]
    fn host_figures_are_read() {
        let h = HostSampler::default();
        h.sample(Vec::new);
        let g = h.get();
        assert!(g.capacity_cores >= 1.0);
        assert!(g.resident_bytes > 0 && g.mem_total_bytes >= g.mem_available_bytes);
        assert!(g.cpu_seconds > 0.0);
    }
}
