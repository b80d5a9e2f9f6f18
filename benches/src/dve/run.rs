//! One run: its own cluster (`forkd cluster up`, with the policy
//! controller or without), the zone VMs booted on the hosts owning them,
//! the clients driven in real time from a host's namespace, every host's
//! load and VMs sampled once a second, the policy's decisions watched; at
//! the end the drain, the migration reports, the VMs ended and the cluster
//! taken down — whatever happens: the [`Cluster`] guard takes it down on
//! every path (error, panic, signal), and the clients' thread is told to
//! stop before any early return.

use anyhow::{bail, Context, Result};
use bench_shared::api::Api;
use bench_shared::cluster::{check_stop, nap, Cluster};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::clients::{self, Plan, Progress, Shared};
use super::record::{self, Event, HostSample, Record, Sample, Series};
use super::world::World;

/// From the zones' boot to the clients' start.
const SETTLE: Duration = Duration::from_secs(5);

/// Seconds from `start` to now (negative before it).
fn since(start: Instant) -> f64 {
    let now = Instant::now();
    match now.checked_duration_since(start) {
        Some(d) => d.as_secs_f64(),
        None => -(start - now).as_secs_f64(),
    }
}

/// How one run is set up.
#[derive(Debug, Clone)]
pub struct Params {
    pub world: World,
    pub policy: bool,
    pub update_cost: u64,
    pub tick_us: u64,
    pub mem_mib: u64,
    pub state_mib: u64,
    pub cpu_capacity: f64,
    /// The policy's thresholds (JSON) and period, with `policy`.
    pub policy_config: String,
    pub policy_period_ms: u64,
    /// The clients' tick.
    pub client_tick: Duration,
    /// How long the drain may take.
    pub drain: Duration,
    pub forkd: PathBuf,
}

impl Params {
    /// The zone's cmdline: it runs past the run's end (the bench ends it).
    fn cmdline(&self, zone: u32) -> String {
        let d = self.world.config().duration_s;
        // Boot, the run, the drain and a margin, in ticks.
        let secs = d + self.drain.as_secs_f64() + 600.0;
        let ticks = (secs * 1e6 / self.tick_us as f64).ceil() as u64;
        format!(
            "ticks={ticks} tick_us={} state_mib={} seed={} clients=host update_cost={}",
            self.tick_us,
            self.state_mib,
            zone + 1,
            self.update_cost
        )
    }
}

fn vm_number(id: &str) -> Result<u64> {
    id.strip_prefix("vm-")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("VM id {id:?} is not vm-N"))
}

fn ingress_addr(api: &Api) -> Result<SocketAddr> {
    let v = api.get("/v1/clients")?;
    v["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("{}: /v1/clients has no address: {v}", api.host))
}

/// Boots every zone on its first host; the VM number of each zone.
fn boot_zones(p: &Params, apis: &[Api]) -> Result<Vec<u64>> {
    let zones = p.world.config().zones;
    let mut ids = Vec::with_capacity(zones as usize);
    for z in 0..zones {
        check_stop()?;
        let api = &apis[p.world.initial_host(z) as usize];
        let id = api
            .create_vm(&p.cmdline(z), p.mem_mib)
            .with_context(|| format!("boot zone {z} on {}", api.host))?;
        ids.push(id);
    }
    wait_started(apis, &ids, Duration::from_secs(120))?;
    ids.iter().map(|id| vm_number(id)).collect()
}

/// Waits until every zone has printed its `zone: start` line, wherever it
/// runs now (the policy may move a zone while the others boot).
fn wait_started(apis: &[Api], ids: &[String], limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut started = BTreeSet::new();
        for api in apis {
            let v = api.get("/v1/vms")?;
            for vm in v["vms"].as_array().cloned().unwrap_or_default() {
                if vm["state"] == "running" && vm["console_lines"].as_u64() >= Some(2) {
                    if let Some(id) = vm["id"].as_str() {
                        started.insert(id.to_owned());
                    }
                }
            }
        }
        let missing: Vec<&String> = ids.iter().filter(|i| !started.contains(*i)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!(
                "{} zones did not start within {limit:?}: {:?}",
                missing.len(),
                missing.iter().take(10).collect::<Vec<_>>()
            );
        }
        nap(Duration::from_millis(100))?;
    }
}

/// Every host's load and VMs from `GET /v1/cluster` (what the policy sees).
fn sample(api: &Api, t_s: f64, capacity: f64) -> Result<Sample> {
    let v = api.get("/v1/cluster")?;
    let hosts = v["hosts"]
        .as_array()
        .with_context(|| format!("/v1/cluster without hosts: {v}"))?;
    let mut out = Vec::new();
    for h in hosts {
        let Some(l) = h.get("load").filter(|l| l.is_object()) else {
            continue;
        };
        let cpu = l["cpu_cores"].as_f64().unwrap_or(0.0);
        let cap = l["capacity_cores"].as_f64().unwrap_or(capacity);
        let vms = l["vms"].as_array().cloned().unwrap_or_default();
        let running = vms.iter().filter(|v| v["running"] == true).count() as u32;
        let local_clones: u64 = vms
            .iter()
            .filter(|v| v["running"] == true)
            .map(|v| v["family_clones"].as_u64().unwrap_or(0))
            .sum();
        let hosted = l["hosted_clones"].as_u64().unwrap_or(0);
        let clones = (local_clones + hosted) as u32;
        out.push(HostSample {
            host: h["name"].as_str().unwrap_or("?").to_owned(),
            load: if cap > 0.0 { cpu / cap } else { 0.0 },
            cpu_cores: cpu,
            vms: running + clones,
            clones,
        });
    }
    out.sort_by_key(|a| natural(&a.host));
    Ok(Sample { t_s, hosts: out })
}

/// h2 before h10.
fn natural(h: &str) -> (usize, String) {
    (h.len(), h.to_owned())
}

/// The decision records so far (policy on), oldest first.
fn decisions(api: &Api) -> Result<Vec<Value>> {
    let v = api.get("/v1/policy/decisions")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn event(rec: &Value, t_s: f64) -> Event {
    let d = &rec["decision"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    Event {
        t_s,
        action: s(&d["action"]),
        zone: s(&d["zone"]),
        from: if d["from"].is_string() {
            s(&d["from"])
        } else {
            s(&d["host"])
        },
        to: s(&d["to"]),
        outcome: s(&rec["outcome"]),
        reason: s(&d["reason"]),
    }
}

/// The downtime of a migration that was carried out, from its source.
fn downtime_ms(apis: &[Api], e: &Event) -> Option<f64> {
    let api = apis.iter().find(|a| a.host == e.from)?;
    // The report appears once the migration ended: poll briefly.
    for _ in 0..50 {
        let v = api
            .get_optional(&format!("/v1/vms/{}/migration", e.zone))
            .ok()??;
        if let Some(us) = v["report"]["downtime_us"].as_f64() {
            return Some(us / 1e3);
        }
        if v["phase"] == "aborted" {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn progress_line(p: &Progress, s: Option<&Sample>, events: usize) -> String {
    let loads = s
        .map(|s| {
            let l: Vec<String> = s
                .hosts
                .iter()
                .map(|h| format!("{}={:.2}/{}", h.host, h.load, h.vms))
                .collect();
            let r = record::ratios(std::slice::from_ref(s), s.hosts.len());
            format!(
                "{} max/avg {:.2}",
                l.join(" "),
                r.first().map(|x| x.1).unwrap_or(0.0)
            )
        })
        .unwrap_or_default();
    format!(
        "dve: t={:.0}s{} sent {} acked {} unacked {} handovers {} redirects {} decisions {} | {loads}",
        p.t_s,
        if p.draining { " (draining)" } else { "" },
        p.sent,
        p.acked,
        p.unacked,
        p.handovers,
        p.redirects,
        events
    )
}

fn extra_args(p: &Params) -> Vec<String> {
    let zones = p.world.config().zones;
    let mut v = vec![
        "--cpu-capacity".to_owned(),
        p.cpu_capacity.to_string(),
        // Any host may end up with every zone; forks stay small.
        "--max-vms".to_owned(),
        zones.max(16).to_string(),
        "--max-clones".to_owned(),
        "8".to_owned(),
    ];
    if p.policy {
        v.extend([
            "--policy".to_owned(),
            "--policy-period-ms".to_owned(),
            p.policy_period_ms.to_string(),
            "--policy-config".to_owned(),
            p.policy_config.clone(),
        ]);
    }
    v
}

/// Ends every VM of every host (clones end with their parents).
fn end_vms(apis: &[Api]) {
    for api in apis {
        let Ok(v) = api.get("/v1/vms") else { continue };
        for vm in v["vms"].as_array().cloned().unwrap_or_default() {
            if vm["parent_host"].is_string() {
                continue;
            }
            if let Some(id) = vm["id"].as_str() {
                if let Err(e) = api.delete(&format!("/v1/vms/{id}")) {
                    eprintln!("dve: {e:#}");
                }
            }
        }
    }
}

/// Runs the scenario once; the cluster is down when it returns.
pub fn run(p: &Params) -> Result<(Record, Series)> {
    let cfg = p.world.config().clone();
    let label = if p.policy { "on" } else { "off" };
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!(
        "dve: policy {label}: {} zones on {} hosts, {} clients × {} updates/s, {} s; update_cost {}, tick {} µs, capacity {} cores/host",
        cfg.zones, cfg.hosts, cfg.clients, cfg.rate_hz, cfg.duration_s, p.update_cost, p.tick_us, p.cpu_capacity
    );
    let (rows, cols) = p.world.grid();
    eprintln!(
        "dve: a {rows}×{cols} grid; clients per first host at the start {:?}, once arrived {:?}",
        p.world.host_census(0.0),
        p.world.host_census(cfg.duration_s)
    );
    let mut cluster = Cluster::up_with(&p.forkd, cfg.hosts, "dve", "dve", &extra_args(p))?;
    let apis: Vec<Api> = cluster
        .hosts
        .iter()
        .map(|h| Api::new(&h.name, h.endpoint()))
        .collect();
    let netns = cluster
        .hosts
        .first()
        .map(|h| h.netns.clone())
        .context("the cluster has no hosts")?;
    let addrs: Vec<SocketAddr> = apis.iter().map(ingress_addr).collect::<Result<_>>()?;
    let t_boot = Instant::now();
    let zone_vm = boot_zones(p, &apis)?;
    eprintln!(
        "dve: {} zones booted in {:.1} s",
        zone_vm.len(),
        t_boot.elapsed().as_secs_f64()
    );
    let zone_addr = (0..cfg.zones)
        .map(|z| addrs[p.world.initial_host(z) as usize])
        .collect();
    let plan = Plan {
        world: p.world.clone(),
        zone_vm,
        zone_addr,
        tick: p.client_tick,
        drain: p.drain,
        netns,
    };
    let shared = Arc::new(Shared {
        progress: Mutex::new(Progress::default()),
        abort: std::sync::atomic::AtomicBool::new(false),
    });
    // The boot's CPU leaves the hosts' reports before the clients start
    // (samples and decisions before are at negative times).
    let start = Instant::now() + SETTLE;
    let driver = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("dve-clients".into())
            .spawn(move || clients::drive(&plan, &shared, start))
            .context("cannot start the clients' thread")?
    };
    let watched = watch(p, &apis, &shared, start, &driver);
    if watched.is_err() {
        shared.abort.store(true, Ordering::Release);
    }
    let out = driver
        .join()
        .map_err(|_| anyhow::anyhow!("the clients' thread panicked"))?;
    let (samples, mut events, mut seen) = watched?;
    let out = out?;
    // The last decisions.
    if p.policy {
        let t = since(start);
        if let Ok(all) = decisions(&apis[0]) {
            for rec in &all {
                if seen.insert(rec.to_string()) {
                    events.push(event(rec, t));
                }
            }
        }
    }
    let done = |a: &str| {
        events
            .iter()
            .filter(|e| e.action == a && e.outcome == "done")
            .count() as u64
    };
    let max_downtime_ms = events
        .iter()
        .filter(|e| e.action == "migrate" && e.outcome == "done")
        .filter_map(|e| downtime_ms(&apis, e))
        .fold(0.0, f64::max);
    end_vms(&apis);
    cluster.down()?;
    let hosts = cfg.hosts as usize;
    let d = cfg.duration_s;
    // The reports lag a second or two: the first ones predate the clients.
    let from = 2.0_f64.min(d / 4.0);
    let (avg_load, cluster_cpu) = record::mean_load(&samples, hosts, from, d);
    let rec = Record {
        bench: "dve".into(),
        policy: label.into(),
        zones: cfg.zones,
        hosts: cfg.hosts,
        clients: cfg.clients,
        duration_s: d,
        max_over_avg_load: record::worst(&samples, hosts, from, d),
        max_over_avg_load_5s: record::worst_smoothed(&samples, hosts, 5, from, d),
        max_over_avg_load_end: record::worst(&samples, hosts, 0.7 * d, d),
        p99_update_latency_ms: out.p99_us as f64 / 1e3,
        p50_update_latency_ms: out.p50_us as f64 / 1e3,
        lost_updates: out.lost,
        migrations: done("migrate"),
        forks: done("fork"),
        joins: done("join"),
        max_downtime_ms,
        decisions: events.len() as u64,
        decisions_failed: events.iter().filter(|e| e.outcome != "done").count() as u64,
        updates_sent: out.progress.sent,
        updates_acked: out.progress.acked,
        acked_duplicate: out.acked_duplicate,
        resent: out.progress.resent,
        redirects: out.progress.redirects,
        handovers: out.progress.handovers,
        rate_hz: cfg.rate_hz,
        update_cost: p.update_cost,
        tick_us: p.tick_us,
        cpu_capacity: p.cpu_capacity,
        avg_load,
        cluster_cpu_cores: cluster_cpu,
        machine_load_avg: bench_shared::load_avg(),
        policy_config: if p.policy {
            serde_json::from_str(&p.policy_config).ok()
        } else {
            None
        },
        started_unix_s,
    };
    if !out.drained {
        eprintln!(
            "dve: the drain ended with {} updates unacknowledged",
            out.lost
        );
    }
    let series = Series {
        policy: label.into(),
        zones: cfg.zones,
        hosts: cfg.hosts,
        clients: cfg.clients,
        duration_s: d,
        started_unix_s,
        samples,
        events,
    };
    Ok((rec, series))
}

type Watched = (Vec<Sample>, Vec<Event>, BTreeSet<String>);

/// Samples once a second until the clients' thread ends; progress every
/// 5 s; new decisions as they appear.
fn watch(
    p: &Params,
    apis: &[Api],
    shared: &Shared,
    start: Instant,
    driver: &std::thread::JoinHandle<Result<clients::Outcome>>,
) -> Result<Watched> {
    let mut samples = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    let mut last_line = Instant::now();
    let limit =
        Duration::from_secs_f64(p.world.config().duration_s) + p.drain + Duration::from_secs(60);
    let mut tick = Instant::now();
    let mut failures = 0;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    while !driver.is_finished() {
        if start.elapsed() > limit {
            bail!("the clients did not finish within {limit:?}");
        }
        check_stop()?;
        let t = since(start);
        match sample(&apis[0], t, p.cpu_capacity) {
            Ok(s) => samples.push(s),
            Err(e) => {
                failures += 1;
                eprintln!("dve: sample at {t:.0} s: {e:#}");
                if failures > 10 {
                    return Err(e.context("sampling the cluster failed 10 times"));
                }
            }
        }
        if p.policy {
            if let Ok(all) = decisions(&apis[0]) {
                for rec in &all {
                    if seen.insert(rec.to_string()) {
                        let e = event(rec, t);
                        eprintln!(
                            "dve: t={t:.0}s decision: {} {} {}→{} ({}): {}",
                            e.action, e.zone, e.from, e.to, e.outcome, e.reason
                        );
                        events.push(e);
                    }
                }
            }
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            let pr = shared
                .progress
                .lock()
                .map(|g| g.clone())
                .unwrap_or_default();
            eprintln!("{}", progress_line(&pr, samples.last(), events.len()));
        }
        tick += Duration::from_secs(1);
        let wait = tick.saturating_duration_since(Instant::now());
        // Poll the thread's end in small naps.
        let end = Instant::now() + wait;
        while Instant::now() < end && !driver.is_finished() {
            nap(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())))?;
        }
    }
    Ok((samples, events, seen))
}
