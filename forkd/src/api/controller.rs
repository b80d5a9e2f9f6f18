//! The policy controller (`forkd serve --etcd URL --policy`): every daemon
//! so started is a candidate; etcd's election (`/forkd/controller`, under
//! a lease of the daemon's TTL) makes one the leader, so two controllers
//! never act at once. The leader, once a period, builds a
//! [`LoadSnapshot`] from the loads the hosts publish in etcd, asks the
//! pure [`Policy`] what to do, and carries each decision out through the
//! daemons' API ([`ApiActuator`]); every decision, with its inputs, reason
//! and outcome, goes to etcd (`/forkd/decisions/`), where any daemon lists
//! them (`GET /v1/policy/decisions`).
//!
//! A leader that cannot renew its lease (etcd unreachable) stops acting at
//! once and campaigns again when etcd is back; a leader that dies loses its
//! lease within the TTL and another candidate takes over.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use serde::{Deserialize, Serialize};

use super::etcd::{self, timed, ClusterView, EtcdError, EtcdLink};
use super::registry::Registry;
use crate::policy::{Actuator, Decision, HostLoad, LoadSnapshot, Policy, PolicyConfig, ZoneLoad};
use crate::sync::lock;

const ELECTION: &str = "/forkd/controller";
pub const DECISIONS: &str = "/forkd/decisions/";
/// Decisions kept in etcd (older ones are deleted).
const DECISIONS_KEPT: usize = 1000;
/// How long one action (an API call to a daemon) may take.
const ACTION_TIMEOUT: Duration = Duration::from_secs(15);

/// A decision as recorded: who took it and how carrying it out went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub by: String,
    /// The leader's term (its lease id), so that a reader sees which
    /// controller acted.
    pub term: String,
    pub decision: serde_json::Value,
    pub outcome: String,
}

/// `GET /v1/policy`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControllerStatus {
    pub host: String,
    pub leader: bool,
    /// Times this candidate became leader.
    pub terms: u64,
    pub decisions: u64,
    pub period_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

pub struct Controller {
    link: Arc<EtcdLink>,
    config: PolicyConfig,
    period: Duration,
    ttl: Duration,
    status: Mutex<ControllerStatus>,
    /// Last successful lease renewal, ms since `started`.
    renewed_ms: Arc<AtomicU64>,
    started: Instant,
}

impl Controller {
    pub fn new(
        link: Arc<EtcdLink>,
        config: PolicyConfig,
        period: Duration,
        ttl: Duration,
        host: String,
    ) -> Arc<Controller> {
        Arc::new(Controller {
            link,
            config,
            period,
            ttl,
            status: Mutex::new(ControllerStatus {
                host,
                period_ms: period.as_millis() as u64,
                ..ControllerStatus::default()
            }),
            renewed_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        })
    }

    pub fn status(&self) -> ControllerStatus {
        lock(&self.status).clone()
    }

    /// Campaigns, leads, campaigns again, until the registry closes.
    pub async fn run(self: Arc<Self>, reg: Arc<Registry>) {
        while !reg.is_closed() {
            if let Err(e) = self.term(&reg).await {
                tracing::warn!("policy controller: {e}");
                let mut s = lock(&self.status);
                s.leader = false;
                s.last_error = Some(e.to_string());
            }
            lock(&self.status).leader = false;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Still holds its lease: renewed within half the TTL.
    fn fresh(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.renewed_ms.load(Ordering::Acquire))
            < (self.ttl.as_millis() as u64) / 2
    }

    async fn term(&self, reg: &Arc<Registry>) -> Result<(), EtcdError> {
        let ep = self.link.endpoint().to_owned();
        // No per-request timeout: the campaign waits as long as another
        // leads; every other call is bounded by `timed`.
        let mut client = etcd::connect_for_campaign(&ep).await?;
        let ttl = self.ttl.as_secs().max(1) as i64;
        let lease = timed(&ep, client.lease_grant(ttl, None)).await?.id();
        let (mut keeper, mut stream) = timed(&ep, client.lease_keep_alive(lease)).await?;
        self.renewed_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
        // The lease lives while we campaign and lead; the task ends (and
        // the term with it) as soon as a renewal fails.
        let (renewed, started, every) = (self.renewed_ms.clone(), self.started, self.ttl / 3);
        let keep_ep = ep.clone();
        let keep = tokio::spawn(async move {
            loop {
                timed(&keep_ep, keeper.keep_alive()).await?;
                match timed(&keep_ep, stream.message()).await? {
                    Some(r) if r.ttl() > 0 => {
                        renewed.store(started.elapsed().as_millis() as u64, Ordering::Release)
                    }
                    _ => return Err::<(), _>(EtcdError::LeaseLost(keep_ep)),
                }
                tokio::time::sleep(every).await;
            }
        });
        let host = reg.host_name();
        let mut keep = keep;
        let mut campaigner = client.clone();
        tokio::select! {
            r = campaigner.campaign(ELECTION, host.clone(), lease) => {
                r.map_err(|source| EtcdError::Client { endpoint: ep.clone(), source })?;
            }
            _ = &mut keep => return Err(EtcdError::LeaseLost(ep)),
        }
        let term = format!("{lease:x}");
        {
            let mut s = lock(&self.status);
            s.leader = true;
            s.terms += 1;
            s.last_error = None;
        }
        tracing::info!("policy controller: {host} leads (term {term})");
        let mut policy = Policy::new(self.config.clone())
            .map_err(|e| EtcdError::Encode(format!("policy configuration: {e}")))?;
        let actuator = Arc::new(ApiActuator { reg: reg.clone() });
        let mut seq = 0u64;
        while !reg.is_closed() {
            if keep.is_finished() || !self.fresh() {
                keep.abort();
                return Err(EtcdError::LeaseLost(ep));
            }
            let view = etcd::read_cluster(&self.link).await?;
            let snap = snapshot(&view, self.started.elapsed().as_millis() as u64);
            for d in policy.decide(&snap) {
                // Never act on a lease that may have lapsed.
                if keep.is_finished() || !self.fresh() {
                    keep.abort();
                    return Err(EtcdError::LeaseLost(ep));
                }
                let a = actuator.clone();
                let act = d.clone();
                let outcome = tokio::time::timeout(
                    ACTION_TIMEOUT,
                    tokio::task::spawn_blocking(move || a.apply(&act)),
                )
                .await;
                let outcome = match outcome {
                    Ok(Ok(Ok(()))) => "done".to_owned(),
                    Ok(Ok(Err(e))) => format!("failed: {e}"),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(_) => format!("no answer within {ACTION_TIMEOUT:?}"),
                };
                seq += 1;
                self.record(&mut client, &host, &term, seq, &d, &outcome)
                    .await?;
                lock(&self.status).decisions += 1;
            }
            tokio::time::sleep(self.period).await;
        }
        keep.abort();
        let _ = timed(&ep, client.lease_revoke(lease)).await;
        Ok(())
    }

    async fn record(
        &self,
        client: &mut Client,
        host: &str,
        term: &str,
        seq: u64,
        d: &Decision,
        outcome: &str,
    ) -> Result<(), EtcdError> {
        let ep = self.link.endpoint();
        let rec = DecisionRecord {
            by: host.to_owned(),
            term: term.to_owned(),
            decision: serde_json::to_value(d).map_err(|e| EtcdError::Encode(e.to_string()))?,
            outcome: outcome.to_owned(),
        };
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let key = format!("{DECISIONS}{at:015}-{term}-{seq:06}");
        let value = etcd::encode(&rec)?;
        tracing::info!(%outcome, reason = %d.reason, "policy decision recorded");
        timed(ep, client.put(key, value, None)).await?;
        // Bounded: drop the oldest beyond DECISIONS_KEPT.
        let keys = timed(
            ep,
            client.get(
                DECISIONS,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        let n = keys.kvs().len();
        for kv in keys.kvs().iter().take(n.saturating_sub(DECISIONS_KEPT)) {
            let _ = timed(ep, client.delete(kv.key().to_vec(), None)).await;
        }
        Ok(())
    }
}

/// A zone's weight is at most this many times its vCPU time (see
/// [`snapshot`]).
const MAX_WEIGHT_PER_CPU: f64 = 2.0;

/// The policy's view of the cluster: each host's published load, each
/// running VM a zone, with its running clones' vCPU loads as their hosts
/// publish them (its own, or the hosted clones of the others); a clone
/// not sampled yet carries as much as its parent (its clients are split
/// evenly by clone id).
///
/// A zone's weight, the host CPU that moves with it, is its vCPU time
/// scaled by its host's CPU over its zones' vCPU time: the daemon's work
/// for a zone (its clients' updates received, ringed and acknowledged)
/// grows with the zone's own, and goes where the zone goes. The scale is
/// bounded to [1, [`MAX_WEIGHT_PER_CPU`]]: a host's hosted clones and its
/// own fixed work are in its CPU too.
pub fn snapshot(view: &ClusterView, at_ms: u64) -> LoadSnapshot {
    let mut s = LoadSnapshot {
        at_ms,
        ..LoadSnapshot::default()
    };
    // (parent's host, family) → its clones' loads on the other hosts.
    let mut hosted: BTreeMap<(&str, u64), Vec<f64>> = BTreeMap::new();
    for c in view
        .hosts
        .iter()
        .filter_map(|h| h.load.as_ref())
        .flat_map(|l| &l.hosted)
    {
        hosted
            .entry((c.parent_host.as_str(), c.family))
            .or_default()
            .push(c.cpu_cores);
    }
    for h in &view.hosts {
        let Some(l) = &h.load else { continue };
        s.hosts.push(HostLoad {
            mem_available: Some(l.mem_available_bytes),
            ..HostLoad::new(&h.entry.name, l.capacity_cores, l.cpu_cores)
        });
        let first = s.zones.len();
        for vm in l.vms.iter().filter(|v| v.running) {
            let cpu = vm.load.map(|l| l.cpu_cores).unwrap_or(0.0);
            s.zones.push(ZoneLoad {
                zone: vm.id.clone(),
                host: h.entry.name.clone(),
                cpu,
                weight: None,
                clones: if vm.has_family {
                    let elsewhere = vm
                        .families
                        .iter()
                        .filter_map(|f| hosted.get(&(h.entry.name.as_str(), *f)))
                        .flatten();
                    let n = vm.family_clones as usize;
                    let mut known: Vec<f64> = vm
                        .clone_cpu_cores
                        .iter()
                        .chain(elsewhere)
                        .copied()
                        .take(n)
                        .collect();
                    known.resize(n, cpu);
                    known
                } else {
                    Vec::new()
                },
                migrating: vm.migrating,
                dirty_pages_per_s: vm.load.and_then(|l| l.dirty_pages_per_s),
                resident_bytes: vm.load.map(|l| l.resident_bytes),
            });
        }
        let vcpu: f64 = s.zones[first..].iter().map(|z| z.cpu).sum();
        let scale = if vcpu > 0.0 {
            (l.cpu_cores / vcpu).clamp(1.0, MAX_WEIGHT_PER_CPU)
        } else {
            1.0
        };
        for z in &mut s.zones[first..] {
            z.weight = Some(z.cpu * scale);
        }
    }
    s
}

/// Carries decisions out through the daemons' API: this host's registry
/// directly, the others over TCP with the cluster's token.
pub struct ApiActuator {
    reg: Arc<Registry>,
}

impl ApiActuator {
    fn call(&self, host: &str, path: &str, body: &str, want: u16) -> Result<(), String> {
        let peers = self
            .reg
            .peers()
            .ok_or("this daemon has no peers (--peer)")?;
        let (status, resp) = peers
            .call(host, "POST", path, Some(body.as_bytes()), ACTION_TIMEOUT)
            .map_err(|e| e.to_string())?;
        if status == want {
            Ok(())
        } else {
            Err(format!(
                "{host} answered {status}: {}",
                String::from_utf8_lossy(&resp)
            ))
        }
    }

    fn is_here(&self, host: &str) -> bool {
        self.reg.host_name() == host
    }
}

/// `POST /v1/vms/{id}/fork`'s body on `host`: the clone count, and the
/// placement unless every clone stays on `host`.
fn fork_body(host: &str, clones: u32, placement: &BTreeMap<String, u32>) -> String {
    let home = placement.is_empty() || placement.keys().all(|h| h == host);
    let body = if home {
        serde_json::json!({ "clones": clones })
    } else {
        serde_json::json!({ "clones": clones, "hosts": placement })
    };
    body.to_string()
}

fn id_of(zone: &str) -> Result<u64, String> {
    super::types::parse_vm_id(zone).ok_or_else(|| format!("zone '{zone}' is not a VM id"))
}

impl Actuator for ApiActuator {
    fn migrate(&self, zone: &str, from: &str, to: &str) -> Result<(), String> {
        let body = format!(r#"{{"destination": "{to}", "mode": "auto"}}"#);
        if self.is_here(from) {
            let req = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            return self
                .reg
                .migrate(id_of(zone)?, req)
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        self.call(from, &format!("/v1/vms/{zone}/migrate"), &body, 202)
    }

    fn fork(
        &self,
        zone: &str,
        host: &str,
        clones: u32,
        placement: &BTreeMap<String, u32>,
    ) -> Result<(), String> {
        let body = fork_body(host, clones, placement);
        if self.is_here(host) {
            let req = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            return self
                .reg
                .fork(id_of(zone)?, req)
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        self.call(host, &format!("/v1/vms/{zone}/fork"), &body, 200)
    }

    fn join(&self, zone: &str, host: &str) -> Result<(), String> {
        if self.is_here(host) {
            return self
                .reg
                .join(id_of(zone)?)
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        self.call(host, &format!("/v1/vms/{zone}/join"), "{}", 200)
    }
}

/// `GET /v1/policy/decisions`: the decisions in etcd, oldest first.
pub async fn read_decisions(link: &EtcdLink) -> Result<Vec<DecisionRecord>, EtcdError> {
    let ep = link.endpoint();
    let mut client = link.client().await?;
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Key, SortOrder::Ascend);
    let r = timed(ep, client.get(DECISIONS, Some(opts))).await?;
    Ok(r.kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_bodies_carry_the_placement() {
        let p = |v: &[(&str, u32)]| -> BTreeMap<String, u32> {
            v.iter().map(|(h, n)| ((*h).to_owned(), *n)).collect()
        };
        assert_eq!(fork_body("h1", 2, &p(&[])), r#"{"clones":2}"#);
        assert_eq!(fork_body("h1", 2, &p(&[("h1", 2)])), r#"{"clones":2}"#);
        let b = fork_body("h1", 3, &p(&[("h1", 1), ("h3", 2)]));
        let req: super::super::types::ForkVm = serde_json::from_str(&b).unwrap();
        assert_eq!(req.clones, 3);
        let hosts = req.hosts.unwrap();
        assert_eq!((hosts["h1"], hosts["h3"]), (1, 2));
    }

    /// The policy's snapshot carries each zone's published dirty rate,
    /// and weighs each zone with its share of its host's CPU.
    #[test]
    fn snapshots_carry_the_dirty_rate_and_the_weight() {
        let view = ClusterView {
            etcd: LinkStatus::default(),
            hosts: vec![host(
                "h1",
                0.9,
                vec![vm("vm-1", Some(900.0)), vm("vm-3", None)],
                Vec::new(),
            )],
        };
        let s = snapshot(&view, 5);
        let d: Vec<_> = s.zones.iter().map(|z| z.dirty_pages_per_s).collect();
        assert_eq!(d, vec![Some(900.0), None]);
        // 0.9 cores for 0.6 of vCPU: each zone weighs 1.5 × its own.
        for z in &s.zones {
            assert!((z.weight() - 0.45).abs() < 1e-9, "{z:?}");
        }
        // A host busier than MAX_WEIGHT_PER_CPU × its zones: bounded.
        let mut v = view.clone();
        if let Some(l) = v.hosts[0].load.as_mut() {
            l.cpu_cores = 6.0;
        }
        assert!((snapshot(&v, 5).zones[0].weight() - 0.6).abs() < 1e-9);
    }

    use super::super::etcd::{ClusterHost, HostEntry, HostedCloneLoad, LinkStatus, LoadReport};
    use super::super::etcd::{VmLoadRecord, VmReport};

    /// A running VM of 0.3 cores without a family.
    fn vm(id: &str, dirty: Option<f64>) -> VmReport {
        VmReport {
            id: id.into(),
            running: true,
            migrating: false,
            has_family: false,
            family_clones: 0,
            families: Vec::new(),
            clone_cpu_cores: Vec::new(),
            load: Some(VmLoadRecord {
                cpu_cores: 0.3,
                cpu_seconds: 1.0,
                resident_bytes: 0,
                dirty_pages_per_s: dirty,
                faults_per_s: 0.0,
                clone_faults_per_s: 0.0,
                guest_tick_load: None,
                updates_received: None,
                updates_applied: None,
            }),
        }
    }

    fn host(name: &str, cpu: f64, vms: Vec<VmReport>, hosted: Vec<HostedCloneLoad>) -> ClusterHost {
        ClusterHost {
            entry: HostEntry {
                name: name.into(),
                api: None,
                memserver: "127.0.0.1:1".into(),
            },
            load: Some(LoadReport {
                at_ms: 0,
                capacity_cores: 2.0,
                cpu_cores: cpu,
                resident_bytes: 0,
                mem_available_bytes: 0,
                hosted_clones: hosted.len() as u64,
                hosted,
                vms,
            }),
        }
    }

    /// A split zone's clones count at their own loads: its clone on its
    /// host as that host samples it, its clones elsewhere as their hosts
    /// publish them (a clone of another family or another parent's host
    /// is not its own), and one not sampled yet at the parent's load.
    #[test]
    fn a_split_zones_clones_carry_their_own_loads() {
        let mut parent = vm("vm-1", None);
        parent.has_family = true;
        parent.family_clones = 4;
        parent.families = vec![7];
        parent.clone_cpu_cores = vec![0.05];
        let hosted = |parent_host: &str, family, clone_id, cpu_cores| HostedCloneLoad {
            parent_host: parent_host.into(),
            family,
            clone_id,
            cpu_cores,
        };
        let view = ClusterView {
            etcd: LinkStatus::default(),
            hosts: vec![
                host("h1", 0.5, vec![parent], Vec::new()),
                host(
                    "h2",
                    0.4,
                    vec![],
                    vec![
                        hosted("h1", 7, 2, 0.1),
                        hosted("h1", 8, 1, 0.9),
                        hosted("h3", 7, 1, 0.9),
                    ],
                ),
                host("h3", 0.2, vec![], vec![hosted("h1", 7, 3, 0.15)]),
            ],
        };
        let s = snapshot(&view, 5);
        assert_eq!(s.zones.len(), 1, "{s:?}");
        let z = &s.zones[0];
        assert_eq!(z.clones, vec![0.05, 0.1, 0.15, 0.3]);
        assert!((z.demand() - 0.9).abs() < 1e-9, "{z:?}");
        // A report that lists more clones than run: the running count wins.
        let mut v = view.clone();
        if let Some(l) = v.hosts[0].load.as_mut() {
            l.vms[0].family_clones = 2;
        }
        assert_eq!(snapshot(&v, 5).zones[0].clones, vec![0.05, 0.1]);
    }
}
