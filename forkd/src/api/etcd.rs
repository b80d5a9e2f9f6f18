//! Cluster state in etcd (`forkd serve --etcd URL`): this host registers
//! under a lease (`/forkd/hosts/NAME`: its API and memory-server
//! addresses), so that a dead host drops out within the lease's TTL, and
//! publishes its load every second under the same lease
//! (`/forkd/load/NAME`: the host's figures and its VMs'), the policy
//! engine's information policy. `GET /v1/cluster` reads every host back.
//!
//! etcd unreachable: the daemon goes on running its VMs and serving its
//! API; the link retries (0.2 s doubling to 2 s) and re-registers under a
//! new lease when etcd is back. On shutdown the lease is revoked, so the
//! host leaves at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};

use super::load::{HostLoadInfo, VmLoad};
use super::registry::Registry;
use super::types::vm_id;
use crate::sync::lock;

/// Key prefixes.
pub const HOSTS: &str = "/forkd/hosts/";
pub const LOADS: &str = "/forkd/load/";
/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// `--etcd`, `--etcd-ttl-s`.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoint: String,
    pub ttl: Duration,
    /// This host's API address on TCP, as registered.
    pub api: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoint}: {source}")]
    Client {
        endpoint: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {0} did not answer within {CALL_TIMEOUT:?}")]
    Timeout(String),
    #[error("the lease on etcd at {0} expired")]
    LeaseLost(String),
    #[error("a record in etcd cannot be encoded: {0}")]
    Encode(String),
}

/// `/forkd/hosts/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostEntry {
    pub name: String,
    /// The API's TCP address, if it listens on TCP.
    pub api: Option<String>,
    pub memserver: String,
}

/// One VM in a load report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmReport {
    pub id: String,
    pub running: bool,
    pub migrating: bool,
    /// Clones of a live fork family read its memory.
    pub has_family: bool,
    /// That family's clones still running.
    #[serde(default)]
    pub family_clones: u64,
    /// Its live families' ids (hosts that run its clones name them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<u64>,
    /// Its clones on this host: each one's vCPU time per second (those
    /// sampled twice or more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clone_cpu_cores: Vec<f64>,
    #[serde(default)]
    pub load: Option<VmLoadRecord>,
}

/// A clone this host runs for a parent on another host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostedCloneLoad {
    pub parent_host: String,
    pub family: u64,
    pub clone_id: u64,
    /// Its vCPU time per second.
    pub cpu_cores: f64,
}

/// [`VmLoad`] as stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct VmLoadRecord {
    pub cpu_cores: f64,
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    /// Absent from the reports of daemons that do not sample it.
    #[serde(default)]
    pub dirty_pages_per_s: Option<f64>,
    #[serde(default)]
    pub faults_per_s: f64,
    #[serde(default)]
    pub clone_faults_per_s: f64,
    /// The guest's own tick load (busy ÷ budget of its last tick), if it
    /// publishes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_tick_load: Option<f64>,
    /// Client updates received and applied so far, once any came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_received: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_applied: Option<u64>,
}

impl From<VmLoad> for VmLoadRecord {
    fn from(l: VmLoad) -> Self {
        VmLoadRecord {
            cpu_cores: l.cpu_cores,
            cpu_seconds: l.cpu_seconds,
            resident_bytes: l.resident_bytes,
            dirty_pages_per_s: l.dirty_pages_per_s,
            faults_per_s: l.faults_per_s,
            clone_faults_per_s: l.clone_faults_per_s,
            guest_tick_load: l.guest.map(|g| g.load),
            updates_received: l.clients.map(|c| c.received),
            updates_applied: l.clients.map(|c| c.applied),
        }
    }
}

/// `/forkd/load/NAME`: what a host publishes every second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    /// Milliseconds since the Unix epoch, when published.
    pub at_ms: u64,
    pub capacity_cores: f64,
    pub cpu_cores: f64,
    pub resident_bytes: u64,
    pub mem_available_bytes: u64,
    pub hosted_clones: u64,
    /// The hosted clones' loads (those sampled twice or more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosted: Vec<HostedCloneLoad>,
    pub vms: Vec<VmReport>,
}

/// How the link stands, for `GET /v1/cluster`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    pub endpoint: String,
    pub registered: bool,
    pub lease_ttl_s: u64,
    /// Registrations made (1 unless etcd went away and came back).
    pub sessions: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The daemon's link to etcd.
pub struct EtcdLink {
    cfg: EtcdConfig,
    status: std::sync::Mutex<LinkStatus>,
    /// The current session's client and lease, for revoking at shutdown.
    session: tokio::sync::Mutex<Option<(Client, i64)>>,
}

/// `f`, bounded by [`CALL_TIMEOUT`], its error named after `endpoint`.
pub(super) async fn timed<T>(
    endpoint: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(EtcdError::Client {
            endpoint: endpoint.to_owned(),
            source,
        }),
        Err(_) => Err(EtcdError::Timeout(endpoint.to_owned())),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A client of `endpoint` with bounded connect and call times.
pub async fn connect(endpoint: &str) -> Result<Client, EtcdError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT);
    timed(endpoint, Client::connect([endpoint], Some(opts))).await
}

/// A client whose calls have no deadline of their own (an election's
/// campaign waits while another candidate leads); connecting is bounded.
pub async fn connect_for_campaign(endpoint: &str) -> Result<Client, EtcdError> {
    let opts = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT);
    timed(endpoint, Client::connect([endpoint], Some(opts))).await
}

impl EtcdLink {
    pub fn new(cfg: EtcdConfig) -> Arc<EtcdLink> {
        let status = LinkStatus {
            endpoint: cfg.endpoint.clone(),
            lease_ttl_s: cfg.ttl.as_secs(),
            ..LinkStatus::default()
        };
        Arc::new(EtcdLink {
            cfg,
            status: std::sync::Mutex::new(status),
            session: tokio::sync::Mutex::new(None),
        })
    }

    pub fn status(&self) -> LinkStatus {
        lock(&self.status).clone()
    }

    pub fn endpoint(&self) -> &str {
        &self.cfg.endpoint
    }

    /// A client for reads: the registration's own while it has one (a
    /// client multiplexes its calls), else a new connection.
    pub async fn client(&self) -> Result<Client, EtcdError> {
        if let Some((c, _)) = self.session.lock().await.as_ref() {
            return Ok(c.clone());
        }
        connect(&self.cfg.endpoint).await
    }

    /// Registers and reports until the registry closes; retries while etcd
    /// is unreachable.
    pub async fn run(self: Arc<Self>, reg: Arc<Registry>) {
        let mut wait = RETRY_MIN;
        while !reg.is_closed() {
            let started = Instant::now();
            if let Err(e) = self.session(&reg).await {
                tracing::warn!("cluster state: {e}");
                let mut s = lock(&self.status);
                s.registered = false;
                s.last_error = Some(e.to_string());
            }
            if started.elapsed() > RETRY_MAX {
                wait = RETRY_MIN;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    async fn session(&self, reg: &Arc<Registry>) -> Result<(), EtcdError> {
        let ep = self.cfg.endpoint.as_str();
        let mut client = connect(ep).await?;
        let ttl = self.cfg.ttl.as_secs().max(1) as i64;
        let lease = timed(ep, client.lease_grant(ttl, None)).await?.id();
        *self.session.lock().await = Some((client.clone(), lease));
        let name = reg.host_name();
        let entry = HostEntry {
            name: name.clone(),
            api: self.cfg.api.clone(),
            memserver: reg.memserver.local_addr().to_string(),
        };
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        timed(
            ep,
            client.put(format!("{HOSTS}{name}"), encode(&entry)?, with_lease()),
        )
        .await?;
        // A VM this daemon made before a restart may run elsewhere now: its
        // id is not handed out again.
        let reports = load_reports(ep, &mut client).await?;
        reg.skip_vm_ids(
            reports
                .into_values()
                .flat_map(|r| r.vms)
                .filter_map(|v| super::types::parse_vm_id(&v.id)),
        );
        let (mut keeper, mut stream) = timed(ep, client.lease_keep_alive(lease)).await?;
        {
            let mut s = lock(&self.status);
            s.registered = true;
            s.sessions += 1;
            s.last_error = None;
        }
        tracing::info!("registered in etcd at {ep} as {name} (lease {lease:x}, {ttl} s)");
        // Reports (and keep-alives) three times per TTL, at most every second.
        let every = (self.cfg.ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(1));
        while !reg.is_closed() {
            timed(ep, keeper.keep_alive()).await?;
            match timed(ep, stream.message()).await? {
                Some(r) if r.ttl() > 0 => {}
                _ => return Err(EtcdError::LeaseLost(ep.to_owned())),
            }
            let report = reg.load_report();
            timed(
                ep,
                client.put(format!("{LOADS}{name}"), encode(&report)?, with_lease()),
            )
            .await?;
            tokio::time::sleep(every).await;
        }
        Ok(())
    }

    /// Leaves the cluster at once (shutdown): revokes the lease.
    pub async fn leave(&self) {
        if let Some((mut client, lease)) = self.session.lock().await.take() {
            let _ = timed(&self.cfg.endpoint, client.lease_revoke(lease)).await;
        }
    }
}

/// A record as stored in etcd (JSON).
pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, EtcdError> {
    serde_json::to_vec(v).map_err(|e| EtcdError::Encode(e.to_string()))
}

/// `GET /v1/cluster`: one host as etcd has it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterHost {
    #[serde(flatten)]
    pub entry: HostEntry,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub etcd: LinkStatus,
    pub hosts: Vec<ClusterHost>,
}

/// Every host's last load report that reads, by host name.
async fn load_reports(
    ep: &str,
    client: &mut Client,
) -> Result<std::collections::BTreeMap<String, LoadReport>, EtcdError> {
    let loads = timed(ep, client.get(LOADS, Some(GetOptions::new().with_prefix()))).await?;
    Ok(loads
        .kvs()
        .iter()
        .filter_map(|kv| {
            let k = kv.key_str().ok()?;
            let r = serde_json::from_slice::<LoadReport>(kv.value()).ok()?;
            Some((k.trim_start_matches(LOADS).to_owned(), r))
        })
        .collect())
}

/// Every host registered in etcd, with its last load report.
pub async fn read_cluster(link: &EtcdLink) -> Result<ClusterView, EtcdError> {
    let ep = link.endpoint();
    let mut client = link.client().await?;
    let hosts = timed(ep, client.get(HOSTS, Some(GetOptions::new().with_prefix()))).await?;
    let mut reports = load_reports(ep, &mut client).await?;
    let mut out: Vec<ClusterHost> = hosts
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<HostEntry>(kv.value()).ok())
        .map(|entry| ClusterHost {
            load: reports.remove(&entry.name),
            entry,
        })
        .collect();
    out.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
    Ok(ClusterView {
        etcd: link.status(),
        hosts: out,
    })
}

impl Registry {
    /// What this host publishes every second.
    pub(super) fn load_report(&self) -> LoadReport {
        let h: HostLoadInfo = self.host_info();
        let vms = self
            .list_entries()
            .iter()
            .map(|e| {
                let families = e.hub.families();
                let live: Vec<_> = families.iter().filter(|f| !f.is_released()).collect();
                VmReport {
                    id: vm_id(e.id),
                    running: e.is_running(),
                    migrating: e.migrating.load(std::sync::atomic::Ordering::Acquire),
                    has_family: !live.is_empty(),
                    families: live.iter().map(|f| f.id()).collect(),
                    clone_cpu_cores: e.load.clone_cores(),
                    family_clones: live.iter().map(|f| f.running()).sum(),
                    load: self.vm_load(e).map(VmLoadRecord::from),
                }
            })
            .collect();
        LoadReport {
            at_ms: now_ms(),
            capacity_cores: h.capacity_cores,
            cpu_cores: h.cpu_cores,
            resident_bytes: h.resident_bytes,
            mem_available_bytes: h.mem_available_bytes,
            hosted_clones: h.hosted_clones,
            hosted: self
                .host_load
                .hosted_cores()
                .into_iter()
                .map(
                    |((parent_host, family, clone_id), cpu_cores)| HostedCloneLoad {
                        parent_host,
                        family,
                        clone_id,
                        cpu_cores,
                    },
                )
                .collect(),
            vms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report from a daemon that measures no dirty or fault rates still
    /// reads (they default), and the rates survive the round trip.
    #[test]
    fn load_records_round_trip_and_accept_older_reports() {
        let old: VmLoadRecord = serde_json::from_str(
            r#"{"cpu_cores": 0.5, "cpu_seconds": 3.0, "resident_bytes": 4096}"#,
        )
        .expect("an older record");
        assert_eq!(old.dirty_pages_per_s, None);
        assert_eq!((old.faults_per_s, old.clone_faults_per_s), (0.0, 0.0));
        let l = VmLoad {
            cpu_cores: 0.25,
            dirty_pages_per_s: Some(1234.5),
            clone_faults_per_s: 10.0,
            ..VmLoad::default()
        };
        let back: VmLoadRecord =
            serde_json::from_slice(&encode(&VmLoadRecord::from(l)).expect("encode"))
                .expect("decode");
        assert_eq!(back.dirty_pages_per_s, Some(1234.5));
        assert_eq!(back.clone_faults_per_s, 10.0);
    }
}
