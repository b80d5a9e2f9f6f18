//! One fork family on the cluster, end to end: a parent VM on h1 with the
//! bench's cmdline, the fork sent just before one of its tick boundaries
//! (so the clones do not wait a tick before they start working), the
//! family polled until every clone has ended, and around it the parent
//! host's memory server counters, the daemons' resident memory and the
//! loss rules.

use crate::api::{family_ended, find_family, fork_tick, Api, ForkCalls, ForkKind, Forked};
use crate::cluster::{check_stop, nap, vm_rss, Cluster, Host};
use crate::loss::Loss;
use crate::record::counter_delta;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the bench polls the parent's family while clones run.
pub const POLL: Duration = Duration::from_millis(10);
/// The fork is sent this long before the parent's tick boundary.
const FORK_LEAD: Duration = Duration::from_millis(8);
/// Memory counters and RSS baselines are read this long before it.
const BASELINE_LEAD: Duration = Duration::from_millis(400);
/// Tick boundaries after `fork_tick` the fork may still aim at when the
/// bench was late for it (the clones then run fewer ticks: the record's
/// `fork_tick` and `ticks_after_fork` say so).
const MAX_LATE_TICKS: u64 = 2;
/// How often the daemons' VmRSS is sampled.
const RSS_EVERY: Duration = Duration::from_millis(20);

/// The parent's workload and the run's bounds.
#[derive(Debug, Clone)]
pub struct Setup {
    pub hosts: u32,
    pub mem_mib: u64,
    pub state_mib: u64,
    pub alloc_mib: u64,
    pub dirty_pages: u64,
    pub seed: u64,
    pub tick_us: u64,
    /// The tick the fork is aimed at (the parent's state is built by then).
    pub fork_tick: u64,
    /// Ticks the clones run after the fork.
    pub ticks_after: u64,
    /// Bound on one family (fork → all clones ended).
    pub timeout: Duration,
}

impl Setup {
    /// The parent's cmdline: the zone runs `fork_tick + ticks_after` ticks
    /// paced at `tick_us`.
    pub fn cmdline(&self) -> String {
        format!(
            "ticks={} seed={} state_mib={} alloc_mib={} dirty_pages={} tick_us={}",
            self.fork_tick + self.ticks_after,
            self.seed,
            self.state_mib,
            self.alloc_mib,
            self.dirty_pages,
            self.tick_us
        )
    }

    /// `h1`..`hH`: a fork spreads its clones over all of them.
    pub fn all_hosts(&self) -> Vec<String> {
        (1..=self.hosts).map(|i| format!("h{i}")).collect()
    }
}

/// What one family run saw.
pub struct FamilyRun {
    /// The family object of the parent's `GET /v1/vms/{id}` at the end.
    pub fam: Value,
    pub fork_tick: Option<u64>,
    pub parent_line: Option<String>,
    /// Fork request → the poll that saw no clone running.
    pub polled_ended: Duration,
    /// Delta of the parent host's `GET /v1/memserver` (None: no route).
    pub memserver: Option<Value>,
    /// Per clone-hosting host: peak VmRSS during the family − before it.
    pub rss_growth: BTreeMap<String, u64>,
    pub kind_sent: bool,
    pub dropped: Option<u64>,
}

/// Deletes the parent (and with it its clones on every host) and the
/// clone VMs the other hosts keep, whatever happened.
struct Parent<'a> {
    hosts: &'a [Api],
    id: String,
    family: Option<u64>,
}

impl Drop for Parent<'_> {
    fn drop(&mut self) {
        let Some(h1) = self.hosts.first() else {
            return;
        };
        if let Err(e) = h1.delete(&format!("/v1/vms/{}", self.id)) {
            eprintln!("snowflock: deleting the parent {}: {e:#}", self.id);
        }
        if let Some(f) = self.family {
            for h in self.hosts {
                if let Err(e) = h.delete_family_vms(f) {
                    eprintln!("snowflock: deleting family {f}'s VMs on {}: {e:#}", h.host);
                }
            }
        }
    }
}

/// Samples the daemons' VmRSS in a thread until stopped; keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<BTreeMap<String, u64>>,
}

impl RssSampler {
    fn start(daemons: Vec<(String, u32)>, limit: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = BTreeMap::new();
            let t = Instant::now();
            while !flag.load(Ordering::SeqCst) && t.elapsed() < limit {
                for (host, pid) in &daemons {
                    if let Some(b) = vm_rss(*pid) {
                        let p = peak.entry(host.clone()).or_insert(0);
                        *p = b.max(*p);
                    }
                }
                std::thread::sleep(RSS_EVERY);
            }
            peak
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

fn daemons(hosts: &[Host]) -> Vec<(String, u32)> {
    hosts
        .iter()
        .filter_map(|h| Some((h.name.clone(), h.pid?)))
        .collect()
}

fn nap_until(t: Instant) -> Result<()> {
    nap(t.saturating_duration_since(Instant::now()))
}

/// The hosts of the cluster, as API clients, in h1..hH order.
pub fn apis(c: &Cluster) -> Vec<Api> {
    c.hosts
        .iter()
        .map(|h| Api::new(&h.name, h.endpoint()))
        .collect()
}

/// Forks a fresh parent on h1 into `clones` clones spread over `spread`,
/// with `loss_pct` % loss on the clone hosts other than h1, and waits for
/// every clone to end.
pub fn family(
    c: &Cluster,
    hosts: &[Api],
    s: &Setup,
    clones: u64,
    spread: &[String],
    kind: ForkKind,
    loss_pct: f64,
) -> Result<FamilyRun> {
    let h1 = hosts.first().context("the cluster has no hosts")?;
    let cmdline = s.cmdline();
    let id = h1.create_vm(&cmdline, s.mem_mib)?;
    let mut parent = Parent {
        hosts,
        id: id.clone(),
        family: None,
    };
    let started = h1.wait_started(&id, Duration::from_secs(30))?;
    // The loss rules first: a few `ip netns exec nft` take a while.
    let lossy: Vec<String> = c
        .hosts
        .iter()
        .filter(|h| h.name != h1.host && spread.contains(&h.name))
        .map(|h| h.netns.clone())
        .collect();
    let loss = Loss::add(&lossy, loss_pct)?;
    let tick = Duration::from_micros(s.tick_us);
    let daemons = daemons(&c.hosts);
    // Aim at the boundary before `fork_tick`; if this side is late for it
    // (a loaded machine), at one of the next ones.
    let mut aim = s.fork_tick;
    let (ms_before, rss_before) = loop {
        let fork_at = started + tick * aim as u32 - FORK_LEAD;
        let in_time = |lead: Duration| Instant::now() + lead <= fork_at;
        if in_time(BASELINE_LEAD) {
            nap_until(fork_at - BASELINE_LEAD)?;
            let ms = h1.memserver()?;
            let rss: BTreeMap<String, u64> = daemons
                .iter()
                .filter_map(|(h, pid)| Some((h.clone(), vm_rss(*pid)?)))
                .collect();
            if in_time(Duration::ZERO) {
                nap_until(fork_at)?;
                break (ms, rss);
            }
        }
        if aim >= s.fork_tick + MAX_LATE_TICKS || aim + 1 >= s.fork_tick + s.ticks_after {
            bail!(
                "the bench was late for the parent's tick boundaries {}..={aim} (a loaded \
                 machine?); raise --fork-tick or --tick-us",
                s.fork_tick
            );
        }
        aim += 1;
        eprintln!("snowflock:   late for the tick boundary: aiming at tick {aim}");
    };
    let Forked {
        family,
        at,
        kind_sent,
    } = h1.fork(&id, clones, spread, kind)?;
    parent.family = Some(family);
    let sampler = RssSampler::start(daemons, s.timeout);
    let waited = wait_family(h1, &id, family, at, s.timeout);
    let peaks = sampler.finish();
    let (fam, polled_ended) = waited?;
    let ms_after = settled_memserver(h1, ms_before.as_ref())?;
    let dropped = loss.dropped()?;
    drop(loss);
    let memserver = match (&ms_before, &ms_after) {
        (Some(a), Some(b)) => Some(counter_delta(a, b)),
        _ => None,
    };
    let parent_line = parent_end(h1, &id, s)?;
    let lines = h1.console(&id)?;
    let hosting = clone_hosts(&fam, &h1.host);
    let rss_growth = peaks
        .iter()
        .filter(|(h, _)| hosting.contains(*h))
        .map(|(h, p)| {
            (
                h.clone(),
                p.saturating_sub(rss_before.get(h).copied().unwrap_or(*p)),
            )
        })
        .collect();
    Ok(FamilyRun {
        fam,
        fork_tick: fork_tick(&lines),
        parent_line,
        polled_ended,
        memserver,
        rss_growth,
        kind_sent,
        dropped,
    })
}

/// Polls the parent every [`POLL`] until the family has no running clone;
/// the family then and the time from the fork request.
fn wait_family(
    h1: &Api,
    id: &str,
    family: u64,
    at: Instant,
    limit: Duration,
) -> Result<(Value, Duration)> {
    let path = format!("/v1/vms/{id}");
    loop {
        check_stop()?;
        let v = h1.get(&path)?;
        let now = Instant::now();
        let fam = find_family(&v, family)
            .with_context(|| format!("family {family} is not in {id}'s report: {v}"))?;
        if family_ended(fam) {
            return Ok((fam.clone(), now - at));
        }
        if now - at > limit {
            bail!(
                "family {family}: clones still running {limit:?} after the fork: {}",
                fam["running"]
            );
        }
        std::thread::sleep(POLL);
    }
}

/// The parent host's memory server counters once the family is gone from
/// it (its `families` back to what it was before the fork) and two reads
/// [`POLL`]×5 apart agree: a family's multicast figures move from the live
/// family to the retired totals as it is removed, and a read in between
/// would miss them. Bounded (5 s); the last read after that.
fn settled_memserver(h1: &Api, before: Option<&Value>) -> Result<Option<Value>> {
    let families = |v: &Value| v["families"].as_u64();
    let Some(mut last) = h1.memserver()? else {
        return Ok(None);
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        nap(POLL * 5)?;
        let Some(now) = h1.memserver()? else {
            return Ok(None);
        };
        let gone = families(&now) <= before.and_then(families);
        if gone && now["bytes_sent"] == last["bytes_sent"] {
            return Ok(Some(now));
        }
        last = now;
    }
    eprintln!("snowflock: the memory server's counters did not settle within 5 s");
    Ok(Some(last))
}

/// Waits (bounded) for the parent to end; its last line.
fn parent_end(h1: &Api, id: &str, s: &Setup) -> Result<Option<String>> {
    let limit = Duration::from_micros(s.tick_us * (s.ticks_after + 4)) + Duration::from_secs(10);
    let t = Instant::now();
    loop {
        let v = h1.get(&format!("/v1/vms/{id}"))?;
        if v["state"] != "running" {
            return Ok(v["last_line"].as_str().map(str::to_owned));
        }
        if t.elapsed() > limit {
            eprintln!("snowflock: the parent {id} still runs {limit:?} after its clones ended");
            return Ok(None);
        }
        nap(POLL)?;
    }
}

/// The hosts that ran clones of the family (a clone without `host` runs
/// on the parent's).
fn clone_hosts(fam: &Value, parent_host: &str) -> Vec<String> {
    let mut hs: Vec<String> = crate::record::clones(fam)
        .iter()
        .map(|c| c["host"].as_str().unwrap_or(parent_host).to_owned())
        .collect();
    hs.sort();
    hs.dedup();
    hs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cmdline_and_hosts() {
        let s = Setup {
            hosts: 3,
            mem_mib: 1024,
            state_mib: 64,
            alloc_mib: 4,
            dirty_pages: 64,
            seed: 7,
            tick_us: 50_000,
            fork_tick: 40,
            ticks_after: 4,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            s.cmdline(),
            "ticks=44 seed=7 state_mib=64 alloc_mib=4 dirty_pages=64 tick_us=50000"
        );
        assert_eq!(s.all_hosts(), ["h1", "h2", "h3"]);
        let fam = json!({"clones": [{}, {"host": "h3"}, {"host": "h2"}, {"host": "h3"}]});
        assert_eq!(clone_hosts(&fam, "h1"), ["h1", "h2", "h3"]);
    }
}
