//! `forkd cluster status`: what of a local cluster exists and runs, from
//! its state file checked against the namespaces and processes there are.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::netns::{self, IpError};
use super::process;
use super::state::{self, ClusterState, HostRecord, NameError, StateError};

/// The TCP port of each host's API unless `cluster up --port` says otherwise.
pub const DEFAULT_PORT: u16 = 7070;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot list the network namespaces")]
    Ip(#[from] IpError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Namespace there, daemon alive inside it, socket there.
    Running,
    /// Namespace there, daemon gone (or not in it, or its socket gone).
    Dead,
    /// Namespace gone.
    Missing,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Running => "running",
            HostState::Dead => "dead",
            HostState::Missing => "missing",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterStateKind {
    /// Every host runs.
    Running,
    /// A state file, but some host is dead or missing, or the bridge is.
    Degraded,
    /// No state file, but namespaces of the cluster exist (`down` removes
    /// them).
    Leftover,
    /// Nothing of the cluster exists.
    Absent,
}

impl ClusterStateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterStateKind::Running => "running",
            ClusterStateKind::Degraded => "degraded",
            ClusterStateKind::Leftover => "leftover",
            ClusterStateKind::Absent => "absent",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub state: HostState,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub state: ClusterStateKind,
    pub dir: PathBuf,
    pub subnet: String,
    pub bridge_netns: String,
    pub bridge_present: bool,
    pub token_file: PathBuf,
    pub hosts: Vec<HostStatus>,
    pub etcd: EtcdStatus,
}

/// The cluster's etcd.
#[derive(Debug, Clone, Serialize)]
pub struct EtcdStatus {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub running: bool,
}

/// A host's state now.
pub fn host_state(h: &HostRecord) -> HostState {
    let Some(ns_ino) = netns::inode(&h.netns) else {
        return HostState::Missing;
    };
    let daemon_ok = h.pid.is_some_and(|pid| {
        process::alive(pid, h.pid_start) && process::netns_inode(pid) == Some(ns_ino)
    });
    if daemon_ok && h.socket.exists() {
        HostState::Running
    } else {
        HostState::Dead
    }
}

/// The host indices of cluster `name`'s namespaces that exist, and
/// whether its bridge namespace does.
pub fn discover(name: &str) -> Result<(Vec<u32>, bool), IpError> {
    let mut hosts = Vec::new();
    let mut net = false;
    for ns in netns::list()? {
        match state::parse_netns(name, &ns) {
            Some(Some(i)) => hosts.push(i),
            Some(None) => net = true,
            None => {}
        }
    }
    hosts.sort_unstable();
    Ok((hosts, net))
}

/// The status of cluster `name` in `dir`.
pub fn status(name: &str, dir: &Path) -> Result<ClusterStatus, StatusError> {
    state::check_name(name)?;
    let recorded = ClusterState::load(dir)?;
    let (found, net) = discover(name)?;
    let has_state = recorded.is_some();
    let st = match recorded {
        Some(s) => s,
        None => {
            // No state file: describe what a cluster of this name would be
            // and keep only the hosts whose namespaces are there.
            let top = found.iter().copied().max().unwrap_or(0);
            let mut plan = ClusterState::plan(name, dir, top.min(state::MAX_HOSTS), DEFAULT_PORT);
            plan.hosts
                .retain(|h| state::host_index(&h.name).is_some_and(|i| found.contains(&i)));
            plan
        }
    };
    let hosts: Vec<HostStatus> = st
        .hosts
        .iter()
        .map(|h| HostStatus {
            name: h.name.clone(),
            netns: h.netns.clone(),
            address: h.address,
            socket: h.socket.clone(),
            tcp: h.tcp,
            pid: h.pid,
            state: host_state(h),
        })
        .collect();
    let bridge_present =
        net && netns::ip_in(&st.bridge_netns, &["link", "show", "dev", &st.bridge]).is_ok();
    let etcd = EtcdStatus {
        url: st.etcd.client_url.clone(),
        pid: st.etcd.pid,
        running: st
            .etcd
            .pid
            .is_some_and(|pid| process::alive(pid, st.etcd.pid_start)),
    };
    let state = if has_state {
        let all = hosts.iter().all(|h| h.state == HostState::Running);
        if all && bridge_present && etcd.running && !hosts.is_empty() {
            ClusterStateKind::Running
        } else {
            ClusterStateKind::Degraded
        }
    } else if net || !found.is_empty() {
        ClusterStateKind::Leftover
    } else {
        ClusterStateKind::Absent
    };
    Ok(ClusterStatus {
        name: st.name,
        state,
        dir: st.dir,
        subnet: st.subnet,
        bridge_netns: st.bridge_netns,
        bridge_present,
        token_file: st.token_file,
        hosts,
        etcd,
    })
}

/// The status as a table for people.
pub fn table(s: &ClusterStatus) -> String {
    let mut out = format!(
        "cluster {}: {} (subnet {}, bridge {} in {}{}, dir {})\n",
        s.name,
        s.state.as_str(),
        s.subnet,
        state::BRIDGE,
        s.bridge_netns,
        if s.bridge_present { "" } else { ": missing" },
        s.dir.display()
    );
    out.push_str(&format!(
        "etcd {} ({})\n",
        s.etcd.url,
        match (s.etcd.running, s.etcd.pid) {
            (true, Some(p)) => format!("running, pid {p}"),
            _ => "not running".into(),
        }
    ));
    if s.hosts.is_empty() {
        return out;
    }
    let rows: Vec<[String; 7]> = s
        .hosts
        .iter()
        .map(|h| {
            [
                h.name.clone(),
                h.state.as_str().to_owned(),
                h.netns.clone(),
                h.address.to_string(),
                h.tcp.to_string(),
                h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                h.socket.display().to_string(),
            ]
        })
        .collect();
    let head = [
        "HOST",
        "STATE",
        "NAMESPACE",
        "ADDRESS",
        "TCP",
        "PID",
        "SOCKET",
    ];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.push('\n');
        l
    };
    out.push_str(&line(head.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
