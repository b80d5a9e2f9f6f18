//! What a local cluster is made of, named from the cluster's name, and its
//! state file (`state.json` in the cluster directory, mode 0600, written
//! atomically).
//!
//! Names: namespaces `forkd-C-h1..hN` (one per host) and `forkd-C-net`
//! (the bridge `br0`); in the bridge namespace host `hI`'s veth end is
//! `vhI`, in the host's namespace it is `eth0`. The subnet is
//! `10.77.X.0/24` with X derived from the name (1..=250); host `hI` is
//! `10.77.X.I`. Interface names are per namespace, so none of them can
//! clash with the machine's own.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The state file's format version.
pub const VERSION: u32 = 2;
/// Most hosts one local cluster may have.
pub const MAX_HOSTS: u32 = 64;
/// Where cluster directories go unless `--dir` says otherwise.
pub const BASE_DIR: &str = "/run/forkd/clusters";
/// Name of the state file in the cluster directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the token file in the cluster directory.
pub const TOKEN_FILE: &str = "token";
/// Per-host files in `DIR/hI/`.
pub const SOCKET_FILE: &str = "api.sock";
pub const LOG_FILE: &str = "serve.log";
/// The cluster's etcd: its data directory and log, in the cluster's
/// directory; it listens on the bridge at `.254` of the subnet.
pub const ETCD_DATA: &str = "etcd";
pub const ETCD_LOG: &str = "etcd.log";
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
const ETCD_OCTET: u8 = 254;
/// The bridge's name inside the bridge namespace.
pub const BRIDGE: &str = "br0";
/// A host's interface name inside its namespace.
pub const HOST_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("cluster name '{0}': use 1 to 12 characters from a-z and 0-9 (it goes into namespace names)")]
    Bad(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the cluster state {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the cluster state {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the cluster state {path} has version {found}; this forkd reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write the cluster state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Checks a cluster name.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let ok = (1..=12).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(NameError::Bad(name.to_owned()))
    }
}

/// The default directory of cluster `name`.
pub fn default_dir(name: &str) -> PathBuf {
    Path::new(BASE_DIR).join(name)
}

/// The third octet of the cluster's subnet (FNV-1a of the name, 1..=250).
pub fn subnet_octet(name: &str) -> u8 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (h % 250) as u8 + 1
}

/// The cluster's /24.
pub fn subnet(name: &str) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet_octet(name), 0)
}

/// The bridge namespace of cluster `name`.
pub fn net_netns(name: &str) -> String {
    format!("forkd-{name}-net")
}

/// Host `index`'s namespace (hosts count from 1).
pub fn host_netns(name: &str, index: u32) -> String {
    format!("forkd-{name}-h{index}")
}

/// Whether `ns` is one of cluster `name`'s namespaces: `forkd-C-net` or
/// `forkd-C-hI`; gives the host index for a host namespace.
pub fn parse_netns(name: &str, ns: &str) -> Option<Option<u32>> {
    let rest = ns.strip_prefix("forkd-")?.strip_prefix(name)?;
    let rest = rest.strip_prefix('-')?;
    if rest == "net" {
        return Some(None);
    }
    host_index(rest).map(Some)
}

/// `hI` → I (I ≥ 1, no leading zero).
pub fn host_index(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('h')?;
    if digits.starts_with('0') || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One host of the cluster as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// `hI`.
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The host's interface (in its namespace).
    pub ifname: String,
    /// The veth end on the bridge (in the bridge namespace).
    pub bridge_port: String,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    pub log: PathBuf,
    /// The daemon, once started: its pid and start time (clock ticks
    /// since boot, `/proc/PID/stat` field 22) so a reused pid is not
    /// taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

/// The whole cluster as recorded in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    pub version: u32,
    pub name: String,
    pub dir: PathBuf,
    /// `10.77.X.0/24`.
    pub subnet: String,
    /// The namespace holding the bridge.
    pub bridge_netns: String,
    pub bridge: String,
    pub token_file: PathBuf,
    pub hosts: Vec<HostRecord>,
    /// The cluster's etcd, in the bridge's namespace.
    pub etcd: EtcdRecord,
}

/// The cluster's etcd server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdRecord {
    /// The bridge's address, where etcd listens.
    pub address: Ipv4Addr,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

impl ClusterState {
    /// The plan of a cluster: every name and address, no daemon yet.
    pub fn plan(name: &str, dir: &Path, hosts: u32, port: u16) -> ClusterState {
        let net = subnet(name).octets();
        let hosts = (1..=hosts)
            .map(|i| {
                // MAX_HOSTS keeps the last octet below the broadcast address.
                let address = Ipv4Addr::new(net[0], net[1], net[2], i as u8);
                let host_dir = dir.join(format!("h{i}"));
                HostRecord {
                    name: format!("h{i}"),
                    netns: host_netns(name, i),
                    address,
                    prefix_len: 24,
                    ifname: HOST_IF.into(),
                    bridge_port: format!("vh{i}"),
                    socket: host_dir.join(SOCKET_FILE),
                    tcp: SocketAddr::V4(SocketAddrV4::new(address, port)),
                    log: host_dir.join(LOG_FILE),
                    pid: None,
                    pid_start: None,
                }
            })
            .collect();
        let address = Ipv4Addr::new(net[0], net[1], net[2], ETCD_OCTET);
        let etcd = EtcdRecord {
            address,
            client_url: format!("http://{address}:{ETCD_CLIENT_PORT}"),
            peer_url: format!("http://{address}:{ETCD_PEER_PORT}"),
            data_dir: dir.join(ETCD_DATA),
            log: dir.join(ETCD_LOG),
            pid: None,
            pid_start: None,
        };
        ClusterState {
            version: VERSION,
            etcd,
            name: name.to_owned(),
            dir: dir.to_owned(),
            subnet: format!("{}/24", subnet(name)),
            bridge_netns: net_netns(name),
            bridge: BRIDGE.into(),
            token_file: dir.join(TOKEN_FILE),
            hosts,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads `DIR/state.json`; `Ok(None)` if there is none.
    pub fn load(dir: &Path) -> Result<Option<ClusterState>, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        if v.version != VERSION {
            return Err(StateError::Version {
                path,
                found: v.version,
            });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Writes `DIR/state.json` (mode 0600) through a temporary file and a
    /// rename, so a crash never leaves half a file.
    pub fn save(&self) -> Result<(), StateError> {
        let path = Self::path(&self.dir);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let write = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut text =
            serde_json::to_string_pretty(self).map_err(|e| write(io::Error::other(e)))?;
        text.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write)?;
        f.write_all(text.as_bytes()).map_err(write)?;
        f.sync_all().map_err(write)?;
        std::fs::rename(&tmp, &path).map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["local", "t1", "abcdefghijkl"] {
            check_name(good).unwrap();
        }
        for bad in ["", "A", "a-b", "a_b", "abcdefghijklm", "a/b", "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_netns("a", "forkd-a-net"), Some(None));
        assert_eq!(parse_netns("a", "forkd-a-h12"), Some(Some(12)));
        assert_eq!(parse_netns("a", "forkd-ab-h1"), None);
        assert_eq!(parse_netns("a", "forkd-a-h01"), None);
        assert_eq!(parse_netns("a", "forkd-a-h"), None);
        assert_eq!(parse_netns("a", "forkd-a-x1"), None);
        assert_eq!(parse_netns("a", "other"), None);
    }

    #[test]
    fn plan_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ClusterState::plan("t", dir.path(), 3, 7070);
        let o = subnet_octet("t");
        assert!((1..=250).contains(&o));
        assert_eq!(s.subnet, format!("10.77.{o}.0/24"));
        assert_eq!(s.hosts[2].name, "h3");
        assert_eq!(s.hosts[2].netns, "forkd-t-h3");
        assert_eq!(s.hosts[2].tcp.to_string(), format!("10.77.{o}.3:7070"));
        assert_eq!(s.etcd.client_url, format!("http://10.77.{o}.254:2379"));
        assert_eq!(ClusterState::load(dir.path()).unwrap(), None);
        s.hosts[0].pid = Some(42);
        s.hosts[0].pid_start = Some(7);
        s.save().unwrap();
        let mode = std::fs::metadata(ClusterState::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClusterState::load(dir.path()).unwrap(), Some(s));
        std::fs::write(ClusterState::path(dir.path()), "{\"version\": 9}").unwrap();
        assert!(matches!(
            ClusterState::load(dir.path()),
            Err(StateError::Version { found: 9, .. })
        ));
        std::fs::write(ClusterState::path(dir.path()), "garbage").unwrap();
        assert!(matches!(
            ClusterState::load(dir.path()),
            Err(StateError::Parse { .. })
        ));
    }
}
