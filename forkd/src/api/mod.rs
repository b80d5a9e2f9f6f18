//! `forkd serve`: the host fork API, JSON over HTTP/1.1 on a Unix socket
//! (always) and on TCP (optional, loopback unless asked otherwise). The
//! routes are described by `forkd/api/openapi.json`:
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/vms` | boot a VM → 201 `{id, state}` |
//! | `GET /v1/vms` | every VM, exited ones included until deleted |
//! | `GET /v1/vms/{id}` | state, exit, console tail, fork families and clones |
//! | `GET /v1/vms/{id}/console` | the console lines kept |
//! | `POST /v1/vms/{id}/fork` | host-initiated fork → `{family, clones}` |
//! | `POST /v1/vms/{id}/migrate` | live-migrate the VM to another host → 202 (`migration`) |
//! | `GET /v1/vms/{id}/migration` | the VM's last migration: progress, report |
//! | `DELETE /v1/vms/{id}/migration` | cancel it before its commit → 202 |
//! | `DELETE /v1/vms/{id}` | kill the VM and its clones → 204 |
//! | `POST /v1/families` | daemon to daemon: host clones of a parent elsewhere → 201 |
//! | `GET /v1/families/{family}` | the hosted clones' state (polled by the parent's host) |
//! | `DELETE /v1/families/{family}` | kill the hosted clones → 204 |
//! | `POST /v1/migrations` | daemon to daemon: open an incoming migration → 201 (port, secret) |
//! | `GET /v1/migrations/{id}` | what an incoming migration received |
//! | `DELETE /v1/migrations/{id}` | abort it unless committed → the decision |
//!
//! Errors are `{"error": "..."}` with 400/401/404/405/409/422/429/500/502/503.
//! The Unix socket is made 0600 and needs nothing more. TCP binds to
//! loopback unless `--tcp-allow-remote` is given, which needs
//! `--token-file`: with a token file every TCP request must carry
//! `Authorization: Bearer <token>` (401 otherwise, see `auth`).

pub mod auth;
pub mod client;
mod clients_state;
pub mod cluster_links;
pub mod controller;
pub mod error;
pub mod etcd;
mod extract;
mod family_view;
pub mod hosted;
pub mod http;
mod ids;
pub mod load;
pub mod metrics;
pub mod migration;
mod migration_clone;
mod migration_open;
mod migration_table;
pub mod peers;
pub mod registry;
pub mod types;
pub mod updates;

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use memserver::server::{MemServer, ServerLimits};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;

pub use error::ApiError;
pub use load::DirtySampling;
pub use registry::{Limits, Registry};

/// In-flight requests get this long to finish after SIGINT/SIGTERM.
const DRAIN: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    /// Allow a non-loopback TCP address (needs `token_file`).
    pub tcp_allow_remote: bool,
    /// TCP requests must carry the bearer token in this file.
    pub token_file: Option<PathBuf>,
    /// This host's name among its peers (`--name`).
    pub name: Option<String>,
    /// Other hosts clones may be placed on (`--peer NAME=IP:PORT`).
    pub peers: Vec<(String, SocketAddr)>,
    pub limits: Limits,
    /// The cluster's etcd (`--etcd URL`, `--etcd-ttl-s`): register this
    /// host under a lease and publish its load there.
    pub etcd: Option<(String, Duration)>,
    /// Run a policy controller candidate (needs `etcd`), deciding every
    /// this often.
    pub policy: Option<(Duration, crate::policy::PolicyConfig)>,
    /// The cores this host offers its zones (`--cpu-capacity`).
    pub capacity_cores: Option<f64>,
    /// Dirty-rate sampling (`--dirty-sample-every-ms`, `--dirty-window-ms`).
    pub dirty_sampling: load::DirtySampling,
    /// The client ingress (`--clients-udp`): `None` off; an address with
    /// port 0 takes any free port.
    pub clients_udp: Option<SocketAddr>,
    /// Called once with where the API listens (e.g. `unix:PATH tcp:ADDR`),
    /// when it does.
    pub on_listening: fn(&str),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another server answers on {0}; stop it or pass another --socket")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("{0} is not a loopback address; pass --tcp-allow-remote and --token-file to listen there with a bearer token")]
    RemoteTcp(SocketAddr),
    #[error("--tcp-allow-remote needs --token-file: a non-loopback API must check a bearer token")]
    RemoteWithoutToken,
    #[error("--name and --peer need --token-file (peers are reached with the cluster's token), and --peer needs --name")]
    PeersWithoutCluster,
    #[error(transparent)]
    Token(#[from] auth::TokenError),
    #[error("cannot listen on tcp {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    #[error("cannot start the memory server")]
    MemServer(#[source] memserver::server::ServerError),
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "--max-vms and --max-clones allow {needed} open files, but RLIMIT_NOFILE's hard limit is {hard}: lower them or raise the limit"
    )]
    FdLimit { needed: u64, hard: u64 },
    #[error("the server stopped unexpectedly: {0}")]
    Stopped(String),
}

/// File descriptors one VM may hold: KVM VM and vCPU, userfaultfd and its
/// wake-up eventfd, page-client sockets, with room to spare.
const FDS_PER_VM: u64 = 8;
/// The daemon's own: sockets, runtime, memory server, stdio.
const FDS_BASE: u64 = 256;

/// Makes sure the daemon can open the file descriptors its limits allow
/// (every VM with a full fork family): raises the soft RLIMIT_NOFILE up to
/// the hard limit if needed, and refuses limits that cannot fit.
fn ensure_fd_limit(limits: &Limits) -> Result<(), ServeError> {
    let vms = limits.max_vms as u64 * (1 + limits.max_clones);
    let needed = FDS_BASE + vms * FDS_PER_VM;
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(ServeError::Setup {
            what: "getrlimit(RLIMIT_NOFILE)",
            source: io::Error::last_os_error(),
        });
    }
    if rl.rlim_cur >= needed {
        return Ok(());
    }
    if rl.rlim_max < needed {
        return Err(ServeError::FdLimit {
            needed,
            hard: rl.rlim_max,
        });
    }
    rl.rlim_cur = needed;
    // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up
    // to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return Err(ServeError::Setup {
            what: "setrlimit(RLIMIT_NOFILE)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `$XDG_RUNTIME_DIR/forkd.sock`, else `/tmp/forkd-<uid>.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("forkd.sock"),
        _ => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/forkd-{uid}.sock"))
        }
    }
}

/// `PORT` (on 127.0.0.1) or `IP:PORT`.
pub fn parse_tcp(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("'{s}': expected PORT or IP:PORT (e.g. 127.0.0.1:8080)"))
}

/// Makes `path` free for a new socket: a stale socket (nobody answers) is
/// removed; a live one or a non-socket file is an error.
fn claim_socket(path: &Path) -> Result<(), ServeError> {
    let sock_err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(sock_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_owned()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(sock_err)
        }
        Err(e) => Err(sock_err(e)),
    }
}

/// The socket file we created; removed on drop if it is still ours.
struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Listeners {
    unix: UnixListener,
    tcp: Option<TcpListener>,
    /// For the "listening" line.
    path: PathBuf,
}

async fn listen(cfg: &ServeConfig) -> Result<(Listeners, SocketFile), ServeError> {
    claim_socket(&cfg.socket)?;
    let sock_err = |source| ServeError::Socket {
        path: cfg.socket.clone(),
        source,
    };
    let unix = UnixListener::bind(&cfg.socket).map_err(sock_err)?;
    let ino = std::fs::symlink_metadata(&cfg.socket)
        .map_err(sock_err)?
        .ino();
    let file = SocketFile {
        path: cfg.socket.clone(),
        ino,
    };
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(sock_err)?;
    let tcp = match cfg.tcp {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Tcp { addr, source })?,
        ),
        None => None,
    };
    let path = cfg.socket.clone();
    Ok((Listeners { unix, tcp, path }, file))
}

struct Signals {
    term: Signal,
    int: Signal,
}

/// Installs the SIGTERM/SIGINT handlers (inside the runtime's context).
fn signals() -> Result<Signals, ServeError> {
    let setup = |what| move |source| ServeError::Setup { what, source };
    Ok(Signals {
        term: signal(SignalKind::terminate()).map_err(setup("SIGTERM handler"))?,
        int: signal(SignalKind::interrupt()).map_err(setup("SIGINT handler"))?,
    })
}

/// Serves until SIGINT/SIGTERM, then drains requests (bounded).
async fn run(
    l: Listeners,
    mut sig: Signals,
    registry: Arc<Registry>,
    links: Arc<cluster_links::ClusterLinks>,
    token: Option<auth::Token>,
    on_listening: fn(&str),
) -> Result<(), ServeError> {
    let setup = |what| move |source| ServeError::Setup { what, source };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let stopped = |mut rx: tokio::sync::watch::Receiver<()>| async move {
        let _ = rx.changed().await;
    };
    let app = http::router(registry, links);
    let mut where_ = format!("unix:{}", l.path.display());
    let mut servers = JoinSet::new();
    servers.spawn(
        axum::serve(l.unix, app.clone())
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    if let Some(tcp) = l.tcp {
        let addr = tcp.local_addr().map_err(setup("tcp address"))?;
        where_.push_str(&format!(" tcp:{addr}"));
        let app = match token {
            Some(t) => app.layer(axum::middleware::from_fn_with_state(t, auth::require_token)),
            None => app,
        };
        servers.spawn(
            axum::serve(tcp, app)
                .with_graceful_shutdown(stopped(stop_rx))
                .into_future(),
        );
    }
    tracing::info!("listening on {where_}");
    on_listening(&where_);
    let result = tokio::select! {
        _ = sig.term.recv() => Ok(()),
        _ = sig.int.recv() => Ok(()),
        ended = servers.join_next() => Err(ServeError::Stopped(match ended {
            Some(Ok(Ok(()))) | None => "a listener closed".into(),
            Some(Ok(Err(e))) => e.to_string(),
            Some(Err(e)) => e.to_string(),
        })),
    };
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(DRAIN, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        servers.abort_all();
    }
    result
}

/// Runs the API until SIGINT/SIGTERM; then kills every VM and its clones
/// and removes the socket file.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    if let Some(addr) = cfg.tcp {
        if !addr.ip().is_loopback() && !cfg.tcp_allow_remote {
            return Err(ServeError::RemoteTcp(addr));
        }
    }
    if cfg.tcp_allow_remote && cfg.token_file.is_none() {
        return Err(ServeError::RemoteWithoutToken);
    }
    if (!cfg.peers.is_empty() || cfg.name.is_some())
        && (cfg.token_file.is_none() || cfg.name.is_none())
    {
        return Err(ServeError::PeersWithoutCluster);
    }
    let token = cfg
        .token_file
        .as_deref()
        .map(auth::Token::from_file)
        .transpose()?;
    ensure_fd_limit(&cfg.limits)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("forkd-api")
        .enable_all()
        .build()
        .map_err(|source| ServeError::Setup {
            what: "tokio runtime",
            source,
        })?;
    // Before the socket exists, so a signal never leaves it behind.
    let sig = {
        let _ctx = rt.enter();
        signals()?
    };
    let (listeners, file) = rt.block_on(listen(&cfg))?;
    // Clones on other hosts reach the memory server at the API's address.
    let memserver = match cfg.tcp {
        Some(addr) if !addr.ip().is_loopback() => {
            MemServer::bind(SocketAddr::new(addr.ip(), 0), ServerLimits::default())
        }
        _ => MemServer::loopback(),
    }
    .map_err(ServeError::MemServer)?;
    let peers = match (&token, &cfg.name) {
        (Some(t), Some(name)) => Some(Arc::new(peers::Peers::new(
            name.clone(),
            cfg.peers.clone(),
            t.bytes(),
        ))),
        _ => None,
    };
    let registry = Registry::new(Arc::new(memserver), cfg.limits, peers);
    let mut links = cluster_links::ClusterLinks::default();
    if let Some((endpoint, ttl)) = &cfg.etcd {
        let link = etcd::EtcdLink::new(etcd::EtcdConfig {
            endpoint: endpoint.clone(),
            ttl: *ttl,
            api: cfg.tcp.map(|a| a.to_string()),
        });
        links.etcd = Some(link.clone());
        rt.spawn(link.clone().run(registry.clone()));
        if let Some((period, policy)) = cfg.policy.clone() {
            let c = controller::Controller::new(link, policy, period, *ttl, registry.host_name());
            links.controller = Some(c.clone());
            rt.spawn(c.run(registry.clone()));
        }
    }
    if let Some(c) = cfg.capacity_cores {
        let _ = registry.capacity_cores.set(c);
    }
    let _ = registry.dirty_sampling.set(cfg.dirty_sampling);
    if let Some(bind) = cfg.clients_udp {
        let addr = registry
            .start_ingress(bind)
            .map_err(|source| ServeError::Setup {
                what: "client ingress (--clients-udp)",
                source,
            })?;
        tracing::info!("client ingress on udp:{addr}");
    }
    let links = Arc::new(links);
    let reaper = registry
        .start_reaper()
        .map_err(|source| ServeError::Setup {
            what: "reaper thread",
            source,
        })?;
    let served = rt.block_on(run(
        listeners,
        sig,
        registry.clone(),
        links.clone(),
        token,
        cfg.on_listening,
    ));
    registry.stop_ingress();
    registry.shutdown();
    if let Some(link) = &links.etcd {
        rt.block_on(link.leave());
    }
    let _ = reaper.join();
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(file);
    served
}
