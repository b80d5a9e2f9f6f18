//! `forkd cluster up` and `down`: a local cluster of N hosts on this
//! machine.
//!
//! Every host is a network namespace `forkd-C-hI` with one interface,
//! `eth0` (10.77.X.I/24, a 224.0.0.0/4 route so multicast leaves by it),
//! the end of a veth pair whose other end, `vhI`, is a port of the bridge
//! `br0`. The bridge lives in a namespace of its own, `forkd-C-net`: the
//! root namespace's interfaces and routes are never touched, and nothing
//! of the cluster can reach the machine's real interfaces. Each host runs
//! `forkd serve` inside its namespace (`ip netns exec`), its API on
//! `DIR/hI/api.sock` (0600, in a 0700 directory) and on TCP at
//! 10.77.X.I:PORT, where every request needs the cluster's bearer token
//! (`DIR/token`, 32 random bytes in hex, 0600). The cluster's etcd runs in
//! the bridge's namespace, listening on the bridge at 10.77.X.254:2379
//! (data in `DIR/etcd`, log `DIR/etcd.log`); every daemon registers there
//! (`forkd serve --etcd`).
//!
//! `up` refuses when any part of the cluster already exists (a state file,
//! a namespace of its name, a non-empty directory) and says to run `down`
//! first; an `up` that fails half-way removes what it made. `down`
//! removes everything of the cluster it can find, from the state file and
//! from the namespaces named after the cluster, whatever state they are
//! in, and is idempotent.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::{self, IpError};
use super::process;
use super::state::{self, ClusterState, HostRecord, NameError, StateError};
use super::status::{self, ClusterStateKind};

/// A daemon gets this long to listen after it is started.
const START_LIMIT: Duration = Duration::from_secs(30);
/// SIGTERM, then SIGKILL after this long (the daemon drains for 3 s).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest Unix socket path (sun_path, with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub dir: PathBuf,
    pub hosts: u32,
    pub port: u16,
    /// The `forkd` binary the hosts run (`serve`).
    pub forkd: PathBuf,
    /// More arguments for every host's `forkd serve` (`--policy`, …).
    pub serve_args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("a local cluster needs root (network namespaces, veth, bridge)")]
    NotRoot,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("--hosts {0}: a local cluster has 1 to {max} hosts", max = state::MAX_HOSTS)]
    Hosts(u32),
    #[error("--port 0: the hosts need a fixed TCP port")]
    Port,
    #[error("cluster {name} already exists ({what}); `forkd cluster down --name {name}` removes it, then run up again")]
    Exists { name: String, what: String },
    #[error("the subnet {subnet} of cluster {name} is in use on this machine ({what}); pick another --name")]
    SubnetInUse {
        name: String,
        subnet: String,
        what: String,
    },
    #[error("the socket path {0} is longer than {MAX_SOCKET_PATH} bytes; pass a shorter --dir")]
    SocketPath(PathBuf),
    #[error("cannot make the cluster directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot set up the cluster's network")]
    Ip(#[from] IpError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("cannot make the token")]
    Random(#[from] memserver::auth::RandomError),
    #[error("cannot write the token file {path}: {source}")]
    Token { path: PathBuf, source: io::Error },
    #[error(
        "etcd is not installed (the cluster keeps its state in it): apt-get install etcd-server"
    )]
    NoEtcd,
    #[error("cannot start the cluster's etcd: {0}")]
    EtcdSpawn(io::Error),
    #[error("the cluster's etcd {why}; its log {log}:\n{tail}")]
    EtcdFailed {
        why: String,
        log: PathBuf,
        tail: String,
    },
    #[error("cannot start the daemon of {host}: {source}")]
    Spawn { host: String, source: io::Error },
    #[error("the daemon of {host} exited ({status}) before listening; its log {log}:\n{tail}")]
    DaemonExited {
        host: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("the daemon of {host} did not listen within {START_LIMIT:?}; its log {log}:\n{tail}")]
    DaemonTimeout {
        host: String,
        log: PathBuf,
        tail: String,
    },
    #[error("the daemon of {host} (pid {pid}) is not inside namespace {netns}")]
    WrongNamespace {
        host: String,
        pid: u32,
        netns: String,
    },
    #[error("{source}; removing what was made also failed: {cleanup}")]
    Cleanup {
        source: Box<UpError>,
        cleanup: Box<DownError>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DownError {
    #[error("removing a local cluster needs root (network namespaces)")]
    NotRoot,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot list the network namespaces")]
    Ip(#[from] IpError),
    #[error(
        "{dir} holds the state of cluster {found}, not {name}; pass the right --name or --dir"
    )]
    OtherCluster {
        dir: PathBuf,
        name: String,
        found: String,
    },
    #[error("some of cluster {name} is left: {}", left.join("; "))]
    Left { name: String, left: Vec<String> },
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn dir_err(path: &Path) -> impl Fn(io::Error) -> UpError + '_ {
    move |source| UpError::Dir {
        path: path.to_owned(),
        source,
    }
}

/// Refuses when anything of the cluster exists already, or its subnet is
/// used in the root namespace.
fn preflight(o: &UpOptions, plan: &ClusterState) -> Result<(), UpError> {
    let exists = |what: String| UpError::Exists {
        name: o.name.clone(),
        what,
    };
    // A state file that does not parse is a cluster too (down handles it).
    let st = match status::status(&o.name, &o.dir) {
        Ok(st) => st,
        Err(status::StatusError::State(e)) => return Err(exists(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    if st.state != ClusterStateKind::Absent {
        let hosts: Vec<String> = st
            .hosts
            .iter()
            .map(|h| format!("{} {}", h.name, h.state.as_str()))
            .collect();
        let what = format!(
            "state {}{}{}",
            st.state.as_str(),
            if hosts.is_empty() { "" } else { ": " },
            hosts.join(", ")
        );
        return Err(exists(what));
    }
    match std::fs::read_dir(&o.dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(exists(format!(
                    "its directory {} is not empty",
                    o.dir.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_err(&o.dir)(e)),
    }
    let etcd_found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
    if !etcd_found {
        return Err(UpError::NoEtcd);
    }
    if let Some(what) = netns::root_use_of(state::subnet(&o.name))? {
        return Err(UpError::SubnetInUse {
            name: o.name.clone(),
            subnet: plan.subnet.clone(),
            what,
        });
    }
    for h in &plan.hosts {
        if h.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(UpError::SocketPath(h.socket.clone()));
        }
    }
    Ok(())
}

/// A directory only root can enter (0700), parents as needed.
fn private_dir(path: &Path) -> Result<(), UpError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(dir_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(dir_err(path))
}

/// 32 random bytes in hex into `path` (0600, must not exist).
fn write_token(path: &Path) -> Result<(), UpError> {
    let mut raw = [0u8; 32];
    memserver::auth::fill_random(&mut raw)?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let err = |source| UpError::Token {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(format!("{hex}\n").as_bytes()).map_err(err)
}

/// The bridge namespace and its bridge (multicast snooping off: with no
/// querier on the bridge, groups are flooded to every port).
fn make_bridge(s: &ClusterState) -> Result<(), IpError> {
    let ns = s.bridge_netns.as_str();
    netns::add(ns)?;
    netns::ip_in(ns, &["link", "set", "lo", "up"])?;
    netns::ip_in(
        ns,
        &[
            "link",
            "add",
            &s.bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ],
    )?;
    netns::ip_in(ns, &["link", "set", &s.bridge, "up"])?;
    // The cluster's etcd listens on the bridge itself.
    let addr = format!("{}/24", s.etcd.address);
    netns::ip_in(ns, &["addr", "add", &addr, "dev", &s.bridge])?;
    Ok(())
}

/// Starts the cluster's etcd in the bridge's namespace (its data and log
/// in the cluster's directory, its own process group) and waits until it
/// serves.
fn start_etcd(s: &mut ClusterState) -> Result<(), UpError> {
    let e = &s.etcd;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&e.log)
        .map_err(UpError::EtcdSpawn)?;
    let log2 = log.try_clone().map_err(UpError::EtcdSpawn)?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &s.bridge_netns, "etcd"])
        .args(["--name", &s.name])
        .arg("--data-dir")
        .arg(&e.data_dir)
        .args(["--listen-client-urls", &e.client_url])
        .args(["--advertise-client-urls", &e.client_url])
        .args(["--listen-peer-urls", &e.peer_url])
        .args(["--initial-advertise-peer-urls", &e.peer_url])
        .args(["--initial-cluster", &format!("{}={}", s.name, e.peer_url)])
        .args(["--initial-cluster-state", "new"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(UpError::EtcdSpawn)?;
    let pid = child.id();
    s.etcd.pid = Some(pid);
    s.etcd.pid_start = process::start_time(pid);
    let failed = |why: String, log: &Path| UpError::EtcdFailed {
        why,
        log: log.to_owned(),
        tail: tail(log),
    };
    let t = Instant::now();
    loop {
        let ready = std::fs::read_to_string(&s.etcd.log)
            .is_ok_and(|l| l.contains("ready to serve client requests"));
        if ready {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(failed(format!("exited ({st})"), &s.etcd.log));
        }
        if t.elapsed() > START_LIMIT {
            return Err(failed(
                format!("did not serve within {START_LIMIT:?}"),
                &s.etcd.log,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The MTU of the hosts' links and the bridge.
pub const CLUSTER_MTU: &str = "9000";

/// A host's namespace, its veth into the bridge, address and routes.
fn make_host(s: &ClusterState, h: &HostRecord) -> Result<(), IpError> {
    let net = s.bridge_netns.as_str();
    let ns = h.netns.as_str();
    netns::add(ns)?;
    netns::ip_in(ns, &["link", "set", "lo", "up"])?;
    netns::ip_in(
        net,
        &[
            "link",
            "add",
            &h.bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            &h.ifname,
            "netns",
            ns,
        ],
    )?;
    // Jumbo frames, as on a data-centre LAN: a 4 KiB page travels in one
    // frame (multicast frames are sized to the interface MTU), so a page
    // lost is one frame lost, not one of three.
    netns::ip_in(net, &["link", "set", &h.bridge_port, "mtu", CLUSTER_MTU])?;
    netns::ip_in(ns, &["link", "set", &h.ifname, "mtu", CLUSTER_MTU])?;
    netns::ip_in(net, &["link", "set", &h.bridge_port, "master", &s.bridge])?;
    netns::ip_in(net, &["link", "set", &h.bridge_port, "up"])?;
    let addr = format!("{}/{}", h.address, h.prefix_len);
    netns::ip_in(ns, &["addr", "add", &addr, "dev", &h.ifname])?;
    netns::ip_in(ns, &["link", "set", &h.ifname, "up"])?;
    netns::ip_in(ns, &["route", "add", "224.0.0.0/4", "dev", &h.ifname])?;
    Ok(())
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Starts `forkd serve` inside the host's namespace, in its own process
/// group (a Ctrl-C at `cluster up` does not reach it), logging to
/// `DIR/hI/serve.log`.
fn spawn_daemon(o: &UpOptions, s: &ClusterState, h: &HostRecord) -> Result<Child, UpError> {
    let host_dir = h.socket.parent().unwrap_or(&s.dir);
    private_dir(host_dir)?;
    let spawn_err = |source| UpError::Spawn {
        host: h.name.clone(),
        source,
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&h.log)
        .map_err(spawn_err)?;
    let log2 = log.try_clone().map_err(spawn_err)?;
    Command::new("ip")
        .args(["netns", "exec", &h.netns])
        .arg(&o.forkd)
        .arg("serve")
        .arg("--socket")
        .arg(&h.socket)
        .arg("--tcp")
        .arg(h.tcp.to_string())
        .arg("--tcp-allow-remote")
        .arg("--token-file")
        .arg(&s.token_file)
        .arg("--name")
        .arg(&h.name)
        .arg("--etcd")
        .arg(&s.etcd.client_url)
        .arg("--clients-udp")
        .arg(std::net::SocketAddr::new(h.tcp.ip(), crate::clients::DEFAULT_PORT).to_string())
        .args(&o.serve_args)
        .args(
            s.hosts
                .iter()
                .filter(|p| p.name != h.name)
                .flat_map(|p| ["--peer".to_owned(), format!("{}={}", p.name, p.tcp)]),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)
}

/// Waits until the daemon says it listens; checks it is inside the host's
/// namespace and records its pid and start time.
fn await_daemon(h: &mut HostRecord, mut child: Child) -> Result<(), UpError> {
    let pid = child.id();
    // `ip netns exec` execs forkd: the same process, the same start time.
    h.pid = Some(pid);
    h.pid_start = process::start_time(pid);
    let t = Instant::now();
    loop {
        let listening =
            std::fs::read_to_string(&h.log).is_ok_and(|l| l.contains("forkd: listening on"));
        if listening && h.socket.exists() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(UpError::DaemonExited {
                host: h.name.clone(),
                status: st.to_string(),
                log: h.log.clone(),
                tail: tail(&h.log),
            });
        }
        if t.elapsed() > START_LIMIT {
            return Err(UpError::DaemonTimeout {
                host: h.name.clone(),
                log: h.log.clone(),
                tail: tail(&h.log),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if process::netns_inode(pid).is_none() || process::netns_inode(pid) != netns::inode(&h.netns) {
        return Err(UpError::WrongNamespace {
            host: h.name.clone(),
            pid,
            netns: h.netns.clone(),
        });
    }
    Ok(())
}

fn up_inner(o: &UpOptions, s: &mut ClusterState) -> Result<(), UpError> {
    private_dir(&s.dir)?;
    // Recorded first, so a crash from here on leaves something `down`
    // reads (it also finds the namespaces by name).
    s.save()?;
    write_token(&s.token_file)?;
    make_bridge(s)?;
    for i in 0..s.hosts.len() {
        make_host(s, &s.hosts[i])?;
        s.save()?;
    }
    let started = start_etcd(s);
    s.save()?;
    started?;
    for i in 0..s.hosts.len() {
        let child = spawn_daemon(o, s, &s.hosts[i])?;
        let waited = await_daemon(&mut s.hosts[i], child);
        s.save()?;
        waited?;
    }
    Ok(())
}

/// Makes the cluster; on failure removes what it made.
pub fn up(o: &UpOptions) -> Result<ClusterState, UpError> {
    state::check_name(&o.name)?;
    if !(1..=state::MAX_HOSTS).contains(&o.hosts) {
        return Err(UpError::Hosts(o.hosts));
    }
    if o.port == 0 {
        return Err(UpError::Port);
    }
    if !is_root() {
        return Err(UpError::NotRoot);
    }
    let mut s = ClusterState::plan(&o.name, &o.dir, o.hosts, o.port);
    preflight(o, &s)?;
    match up_inner(o, &mut s) {
        Ok(()) => Ok(s),
        Err(e) => match down(&o.name, &o.dir) {
            Ok(_) => Err(e),
            Err(cleanup) => Err(UpError::Cleanup {
                source: Box::new(e),
                cleanup: Box::new(cleanup),
            }),
        },
    }
}

/// What `down` did.
#[derive(Debug, Default)]
pub struct DownReport {
    pub stopped: Vec<u32>,
    pub namespaces: Vec<String>,
    pub files: Vec<PathBuf>,
    /// Things `down` left on purpose (e.g. files it did not make).
    pub notes: Vec<String>,
}

impl DownReport {
    pub fn is_empty(&self) -> bool {
        self.stopped.is_empty() && self.namespaces.is_empty() && self.files.is_empty()
    }
}

fn remove_file(path: &Path, r: &mut DownReport, left: &mut Vec<String>) {
    match std::fs::remove_file(path) {
        Ok(()) => r.files.push(path.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => left.push(format!("{}: {e}", path.display())),
    }
}

fn remove_dir(path: &Path, r: &mut DownReport, left: &mut Vec<String>) {
    match std::fs::remove_dir(path) {
        Ok(()) => r.files.push(path.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            let names: Vec<String> = std::fs::read_dir(path)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            r.notes.push(format!(
                "{} kept: it holds files forkd did not make ({})",
                path.display(),
                names.join(", ")
            ));
        }
        Err(e) => left.push(format!("{}: {e}", path.display())),
    }
}

/// Removes everything of cluster `name` (directory `dir`): daemons
/// (SIGTERM, SIGKILL after a bound), namespaces (with them the bridge and
/// veths), sockets, logs, token, state file, directory. Works from the
/// state file and from the namespaces named after the cluster, so a stale
/// or missing state file, a dead daemon or a namespace deleted by hand are
/// all fine. Running it again finds nothing to do.
pub fn down(name: &str, dir: &Path) -> Result<DownReport, DownError> {
    state::check_name(name)?;
    if !is_root() {
        return Err(DownError::NotRoot);
    }
    let mut r = DownReport::default();
    let mut left = Vec::new();
    let recorded = match ClusterState::load(dir) {
        Ok(Some(s)) if s.name != name => {
            return Err(DownError::OtherCluster {
                dir: dir.to_owned(),
                name: name.to_owned(),
                found: s.name,
            })
        }
        Ok(s) => s,
        Err(e) => {
            r.notes.push(format!("ignored: {e}"));
            None
        }
    };
    let (found, net) = status::discover(name)?;
    let mut namespaces: Vec<String> = found.iter().map(|i| state::host_netns(name, *i)).collect();
    let mut procs: Vec<(u32, u64)> = Vec::new();
    if let Some(s) = &recorded {
        let recorded_pids = s
            .hosts
            .iter()
            .map(|h| (h.pid, h.pid_start))
            .chain([(s.etcd.pid, s.etcd.pid_start)]);
        for (pid, start) in recorded_pids {
            if let (Some(pid), Some(start)) = (pid, start) {
                if process::alive(pid, Some(start)) {
                    procs.push((pid, start));
                }
            }
        }
    }
    if net {
        namespaces.push(state::net_netns(name));
    }
    // Whatever runs inside the cluster's namespaces goes too.
    for ns in &namespaces {
        match netns::pids(ns) {
            Ok(pids) => procs.extend(
                pids.into_iter()
                    .filter_map(|p| process::start_time(p).map(|s| (p, s))),
            ),
            Err(e) => left.push(e.to_string()),
        }
    }
    procs.sort_unstable();
    procs.dedup();
    let survivors = process::stop(&procs, STOP_GRACE);
    r.stopped = procs
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !survivors.contains(p))
        .collect();
    for p in survivors {
        left.push(format!("process {p} survived SIGKILL"));
    }
    for ns in namespaces {
        match netns::delete(&ns) {
            Ok(()) => r.namespaces.push(ns),
            Err(e) => left.push(e.to_string()),
        }
    }
    // Files: the host directories (by state and by name), then the rest.
    // Only files inside the cluster directory, whatever the state says.
    let mut host_dirs: Vec<PathBuf> = recorded
        .iter()
        .flat_map(|s| s.hosts.iter())
        .filter_map(|h| h.socket.parent().map(Path::to_owned))
        .filter(|d| d.parent() == Some(dir))
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        host_dirs.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| state::host_index(&e.file_name().to_string_lossy()).is_some())
                .map(|e| e.path()),
        );
    }
    host_dirs.sort();
    host_dirs.dedup();
    for d in &host_dirs {
        remove_file(&d.join(state::SOCKET_FILE), &mut r, &mut left);
        remove_file(&d.join(state::LOG_FILE), &mut r, &mut left);
        remove_dir(d, &mut r, &mut left);
    }
    remove_file(&dir.join(state::TOKEN_FILE), &mut r, &mut left);
    remove_file(&dir.join(state::ETCD_LOG), &mut r, &mut left);
    // etcd's data directory: made by `up`, inside the cluster directory.
    let data = dir.join(state::ETCD_DATA);
    match std::fs::remove_dir_all(&data) {
        Ok(()) => r.files.push(data),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => left.push(format!("{}: {e}", data.display())),
    }
    remove_file(
        &dir.join(format!(".{}.tmp", state::STATE_FILE)),
        &mut r,
        &mut left,
    );
    remove_file(&ClusterState::path(dir), &mut r, &mut left);
    remove_dir(dir, &mut r, &mut left);
    // Nothing of the cluster may be left in the namespace list.
    let (found, net) = status::discover(name)?;
    if net || !found.is_empty() {
        left.push(format!(
            "namespaces still listed: {}",
            found
                .iter()
                .map(|i| state::host_netns(name, *i))
                .chain(net.then(|| state::net_netns(name)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if left.is_empty() {
        Ok(r)
    } else {
        Err(DownError::Left {
            name: name.to_owned(),
            left,
        })
    }
}
