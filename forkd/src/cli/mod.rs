//! The `forkd` command line: `guest-path`, `run`, `restore`, `serve` and
//! `cluster`.

use crate::fork::parent::{ForkHub, ForkOptions};
use crate::guest::default_guest;
use crate::vmm::{RestoreMemory, RestoreOptions, Vm, VmConfig, VmExit};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use memserver::server::MemServer;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cluster;
mod fork_summary;
mod migrate;
mod migrate_progress;
mod target;
mod vm;

#[derive(Parser, Debug)]
#[command(
    name = "forkd",
    version,
    about = "VM fork service for burst scaling of game-world zones"
)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` for machines (one
    /// object per line). The level comes from RUST_LOG (default: warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sends the library's `tracing` events to stderr.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests calling main twice) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the absolute path of the built zone guest ELF.
    GuestPath,
    /// Boot a guest and run it to the end (or snapshot it mid-run).
    Run(RunArgs),
    /// Restore a snapshot and run the guest to the end.
    Restore(RestoreArgs),
    /// Serve the host fork API (JSON over HTTP) until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// A local cluster: N hosts on this machine, each a network namespace
    /// with its own `forkd serve` (needs root).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Talk to a host's API: create, list, get, console, fork, delete VMs.
    #[command(subcommand)]
    Vm(vm::VmCommand),
}

#[derive(Args, Debug)]
pub struct Common {
    /// Print one JSON summary line at the end.
    #[arg(long)]
    pub json: bool,
    /// Prefix console lines with `[NAME]`.
    #[arg(long)]
    pub name: Option<String>,
    /// Give up (and stop the VM) after this many seconds; 0 waits forever.
    #[arg(long, default_value_t = 0)]
    pub timeout_s: u64,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest PVH ELF (default: the zone guest built with forkd).
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// Number of vCPUs (more than one adds an in-kernel irqchip).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// Guest command line, e.g. "ticks=100 seed=7 state_mib=16".
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Pause the guest after this many milliseconds and write a snapshot.
    #[arg(long, requires = "snapshot_dir")]
    pub snapshot_after_ms: Option<u64>,
    /// Directory for the snapshot (created if missing).
    #[arg(long, requires = "snapshot_after_ms")]
    pub snapshot_dir: Option<PathBuf>,
    /// Fetch every page a clone touches (turn the avoidance heuristics off).
    #[arg(long)]
    pub no_avoidance: bool,
    /// Pages a clone fetches per fault at most (read-ahead window, 1..=64).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub readahead: u64,
    /// Most clones one `sf_request_ticket` may grant.
    #[arg(long, default_value_t = 64)]
    pub max_clones: u64,
    /// Keep the parent's frozen pages only as it writes them (no background
    /// copy-out: less memory, more write-protect faults in the parent).
    #[arg(long)]
    pub no_copy_out: bool,
    /// Clones fetch pages only when they fault (no background prefetch of
    /// the pages the guest had allocated at the fork).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Build clone VMs only at `sf_clone` (no warm pool from
    /// `sf_request_ticket` on).
    #[arg(long)]
    pub no_warm_pool: bool,
    /// How clones get their pages: unicast per clone, or multicast to the
    /// family (needs an interface with MULTICAST and a 224.0.0.0/4 route).
    #[arg(long, value_enum, default_value_t)]
    pub distribution: crate::fork::mcdist::Distribution,
    /// Where clones on this host read their pages: the frozen image
    /// directly, or through the memory server (the network path remote
    /// clones take; to compare distributions on one host).
    #[arg(long, value_enum, default_value_t)]
    pub local_pages: LocalPages,
    #[command(flatten)]
    pub common: Common,
}

/// Where clones on the parent's host read their pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LocalPages {
    #[default]
    Direct,
    Network,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot directory written by `forkd run --snapshot-dir`.
    pub dir: PathBuf,
    /// lazy: map the memory file and load pages on first touch (fastest
    /// start); eager: copy it into anonymous memory first (fastest guest).
    #[arg(long, value_enum, default_value_t = MemoryMode::Lazy)]
    pub memory: MemoryMode,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Unix socket to listen on [default: $XDG_RUNTIME_DIR/forkd.sock, else
    /// /tmp/forkd-<uid>.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also listen on TCP: PORT (127.0.0.1) or IP:PORT.
    #[arg(long, value_parser = crate::api::parse_tcp)]
    pub tcp: Option<SocketAddr>,
    /// Allow --tcp on a non-loopback address (needs --token-file).
    #[arg(long, requires = "tcp", requires = "token_file")]
    pub tcp_allow_remote: bool,
    /// TCP requests must carry `Authorization: Bearer <token>` with the
    /// token in this file (mode 0600; its first line). The Unix socket
    /// needs none.
    #[arg(long, requires = "tcp")]
    pub token_file: Option<PathBuf>,
    /// This host's name among its peers: a fork placement naming it means
    /// here (needs --token-file).
    #[arg(long, requires = "token_file", value_parser = |s: &str| crate::api::peers::check_name(s).map(|()| s.to_owned()))]
    pub name: Option<String>,
    /// Another host clones may be placed on, NAME=IP:PORT (its TCP API,
    /// reached with the token of --token-file); repeatable.
    #[arg(long = "peer", requires = "name", value_parser = crate::api::peers::parse_peer)]
    pub peers: Vec<(String, SocketAddr)>,
    /// Most VMs registered at once (exited ones count until deleted).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_vms: u64,
    /// Most clones one fork may ask for.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_clones: u64,
    /// The cluster's etcd (e.g. http://10.77.3.254:2379): this host
    /// registers there under a lease and publishes its load every second.
    #[arg(long)]
    pub etcd: Option<String>,
    /// The registration's lease: a host that stops renewing it drops out
    /// of the cluster this long after.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub etcd_ttl_s: u64,
    /// Run a policy controller candidate (needs --etcd): the one elected
    /// leader forks, joins and migrates zones from the hosts' loads.
    #[arg(long, requires = "etcd")]
    pub policy: bool,
    /// How often the leading controller decides.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub policy_period_ms: u64,
    /// The policy's thresholds, a JSON object of `PolicyConfig` fields
    /// (the others keep their defaults), e.g. '{"high_water": 0.8}'.
    #[arg(long, requires = "policy", value_parser = parse_policy)]
    pub policy_config: Option<crate::policy::PolicyConfig>,
    /// The cores this host offers its zones, as the policy sees it
    /// [default: the machine's online CPUs].
    #[arg(long, value_parser = parse_cores)]
    pub cpu_capacity: Option<f64>,
    /// Measure each VM's dirty rate this often: KVM's dirty log goes on
    /// for --dirty-window-ms, then off again (0: never). A window costs a
    /// writing guest about one trap per watched page it writes (watching
    /// every page: ~0.25-0.7 s of vCPU time for a zone rewriting 32 MiB on
    /// this shadow-paging KVM).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub dirty_sample_every_ms: u64,
    /// How long each dirty-rate window keeps the log on.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub dirty_window_ms: u64,
    /// Each window watches one page in this many, chosen at random, and
    /// scales the count up (where KVM has manual dirty-log protection;
    /// every page otherwise): 1 counts exactly, more traps less.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub dirty_pages_one_in: u32,
    /// The UDP ingress of client updates: IP:PORT, PORT (on the --tcp
    /// address, else 127.0.0.1), or `off` [default: the --tcp address's
    /// IP port 7071 when it is not loopback, else 127.0.0.1 on a free
    /// port; `GET /v1/clients` shows where].
    #[arg(long)]
    pub clients_udp: Option<String>,
}

/// `--clients-udp`: where the client ingress listens.
pub fn clients_udp(
    arg: Option<&str>,
    tcp: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, String> {
    let host = match tcp {
        Some(a) if !a.ip().is_loopback() => a.ip(),
        _ => std::net::Ipv4Addr::LOCALHOST.into(),
    };
    match arg {
        Some("off") => Ok(None),
        Some(s) => match s.parse::<u16>() {
            Ok(port) => Ok(Some(SocketAddr::new(host, port))),
            Err(_) => s
                .parse()
                .map(Some)
                .map_err(|_| format!("--clients-udp '{s}': expected IP:PORT, PORT or off")),
        },
        None if !host.is_loopback() => {
            Ok(Some(SocketAddr::new(host, crate::clients::DEFAULT_PORT)))
        }
        None => Ok(Some(SocketAddr::new(host, 0))),
    }
}

fn parse_policy(s: &str) -> Result<crate::policy::PolicyConfig, String> {
    let c: crate::policy::PolicyConfig =
        serde_json::from_str(s).map_err(|e| format!("policy configuration: {e}"))?;
    c.check().map_err(|e| e.to_string())?;
    Ok(c)
}

fn parse_cores(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if c > 0.0 && c <= 4096.0 => Ok(c),
        _ => Err(format!("'{s}': a number of cores in (0, 4096]")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryMode {
    Lazy,
    Eager,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn since_ms(later: Option<Instant>, earlier: Instant) -> Option<f64> {
    later.map(|t| ms(t.saturating_duration_since(earlier)))
}

fn timeout(c: &Common) -> Option<Duration> {
    (c.timeout_s > 0).then(|| Duration::from_secs(c.timeout_s))
}

/// Waits for the guest; on timeout stops it and fails.
impl Common {
    /// Clone console names: `[NAME.clone-I]`, or `[clone-I]` unnamed.
    fn clone_prefix(&self) -> String {
        self.name
            .as_ref()
            .map(|n| format!("{n}."))
            .unwrap_or_default()
    }
}

fn finish(vm: &mut Vm, c: &Common) -> Result<VmExit> {
    match vm.wait(timeout(c)) {
        Ok(exit) => Ok(exit),
        Err(e) => {
            vm.kill();
            Err(e).context("waiting for the guest")
        }
    }
}

fn exit_code(exit: &VmExit) -> ExitCode {
    if !matches!(exit, VmExit::Guest(_)) {
        eprintln!("forkd: {exit}");
    }
    ExitCode::from(exit.exit_code().clamp(0, 255) as u8)
}

fn run(a: RunArgs) -> Result<ExitCode> {
    let cfg = VmConfig {
        guest: a.guest.unwrap_or_else(default_guest),
        mem_mib: a.mem,
        vcpus: a.vcpus,
        cmdline: a.cmdline,
        echo: true,
        name: a.common.name.clone(),
    };
    let memserver = Arc::new(MemServer::loopback().context("cannot start the memory server")?);
    let hub = ForkHub::new(
        ForkOptions {
            max_clones: a.max_clones,
            echo: true,
            name_prefix: a.common.clone_prefix(),
            avoidance: !a.no_avoidance,
            readahead: a.readahead,
            copy_out: !a.no_copy_out,
            prefetch: !a.no_prefetch,
            warm_pool: !a.no_warm_pool,
            distribution: a.distribution,
            local_direct: a.local_pages == LocalPages::Direct,
            ..ForkOptions::default()
        },
        memserver.clone(),
    );
    let mut vm = Vm::boot_with(&cfg, Some(hub.clone())).context("cannot boot the guest")?;
    let started = vm.times.started;
    let (Some(after), Some(dir)) = (a.snapshot_after_ms, a.snapshot_dir) else {
        let exit = finish(&mut vm, &a.common)?;
        // The parent joined its clones (or ended without): let the rest go.
        if !hub.wait_clones(Duration::from_secs(5)) {
            hub.end_families();
        }
        let families = hub.families();
        let failed = fork_summary::failed_clones(&families);
        if a.common.json {
            let mut summary = json!({
                "event": "run",
                "exit": exit.to_string(),
                "exit_code": exit.exit_code(),
                "boot_to_first_output_ms": since_ms(vm.console().first_output(), started),
                "total_ms": ms(started.elapsed()),
            });
            if !families.is_empty() {
                summary["fork"] = fork_summary::json(&families, &memserver.stats());
            }
            println!("{summary}");
        }
        for (id, why) in &failed {
            eprintln!("forkd: clone {id} failed: {why}");
        }
        if !failed.is_empty() && exit == VmExit::Guest(0) {
            return Ok(ExitCode::FAILURE);
        }
        return Ok(exit_code(&exit));
    };
    let deadline = started + Duration::from_millis(after);
    if let Ok(exit) = vm.wait(Some(deadline.saturating_duration_since(Instant::now()))) {
        bail!(
            "the guest ended ({exit}) after {:.1} ms, before the snapshot point at {after} ms",
            ms(started.elapsed())
        );
    }
    let pause = vm.pause().context("cannot pause the guest")?;
    let stats = vm
        .snapshot(&dir)
        .with_context(|| format!("cannot write the snapshot to {}", dir.display()))?;
    vm.kill();
    eprintln!(
        "forkd: snapshot written to {} ({} bytes of state, {} bytes of memory)",
        dir.display(),
        stats.state_bytes,
        stats.memory_bytes
    );
    if a.common.json {
        println!(
            "{}",
            json!({
                "event": "snapshot",
                "dir": dir.display().to_string(),
                "boot_to_first_output_ms": since_ms(vm.console().first_output(), started),
                "pause_ms": ms(pause),
                "snapshot_write_ms": ms(stats.duration),
                "state_bytes": stats.state_bytes,
                "memory_bytes_written": stats.memory_bytes,
                "bytes_written": stats.state_bytes + stats.memory_bytes,
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let opts = RestoreOptions {
        echo: true,
        name: a.common.name.clone(),
        memory: match a.memory {
            MemoryMode::Lazy => RestoreMemory::Lazy,
            MemoryMode::Eager => RestoreMemory::Eager,
        },
    };
    // A restored zone can fork too.
    let memserver = Arc::new(MemServer::loopback().context("cannot start the memory server")?);
    let hub = ForkHub::new(
        ForkOptions {
            echo: true,
            name_prefix: a.common.clone_prefix(),
            ..ForkOptions::default()
        },
        memserver.clone(),
    );
    let mut vm = Vm::restore_with(&a.dir, &opts, Some(hub.clone()))
        .with_context(|| format!("cannot restore {}", a.dir.display()))?;
    let started = vm.times.started;
    let exit = finish(&mut vm, &a.common)?;
    if !hub.wait_clones(Duration::from_secs(5)) {
        hub.end_families();
    }
    if a.common.json {
        println!(
            "{}",
            json!({
                "event": "restore",
                "memory": format!("{:?}", a.memory).to_lowercase(),
                "exit": exit.to_string(),
                "exit_code": exit.exit_code(),
                "restore_to_first_instruction_ms": since_ms(vm.times.first_run.get().copied(), started),
                "total_ms": ms(started.elapsed()),
            })
        );
    }
    Ok(exit_code(&exit))
}

/// Runs the CLI; errors are printed as `forkd: error: ...` with exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::GuestPath => {
            let p = default_guest();
            if p.is_file() {
                println!("{}", p.display());
                Ok(ExitCode::SUCCESS)
            } else {
                Err(anyhow::anyhow!(
                    "the zone guest was not built: {} is missing",
                    p.display()
                ))
            }
        }
        Command::Run(a) => run(a),
        Command::Restore(a) => restore(a),
        Command::Cluster(c) => cluster::run(c),
        Command::Vm(c) => vm::run(c),
        Command::Serve(a) => clients_udp(a.clients_udp.as_deref(), a.tcp)
            .map_err(anyhow::Error::msg)
            .and_then(|clients_udp| {
                crate::api::serve(crate::api::ServeConfig {
                    clients_udp,
                    on_listening: |at| eprintln!("forkd: listening on {at}"),
                    socket: a.socket.unwrap_or_else(crate::api::default_socket_path),
                    tcp: a.tcp,
                    tcp_allow_remote: a.tcp_allow_remote,
                    token_file: a.token_file,
                    name: a.name,
                    peers: a.peers,
                    limits: crate::api::Limits {
                        max_vms: a.max_vms as usize,
                        max_clones: a.max_clones,
                    },
                    etcd: a
                        .etcd
                        .map(|e| (e, std::time::Duration::from_secs(a.etcd_ttl_s))),
                    policy: a.policy.then(|| {
                        (
                            std::time::Duration::from_millis(a.policy_period_ms),
                            a.policy_config.unwrap_or_default(),
                        )
                    }),
                    capacity_cores: a.cpu_capacity,
                    dirty_sampling: crate::api::DirtySampling {
                        every: (a.dirty_sample_every_ms > 0)
                            .then(|| std::time::Duration::from_millis(a.dirty_sample_every_ms)),
                        window: std::time::Duration::from_millis(a.dirty_window_ms),
                        one_in: a.dirty_pages_one_in,
                    },
                })
                .map_err(anyhow::Error::from)
            })
            .map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("forkd: error: {e:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::clients_udp;
    use std::net::SocketAddr;

    #[test]
    fn clients_udp_defaults_follow_the_tcp_address() {
        let cluster: SocketAddr = "10.77.3.2:7070".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(clients_udp(None, Some(cluster)), Ok(at("10.77.3.2:7071")));
        assert_eq!(clients_udp(None, Some(local)), Ok(at("127.0.0.1:0")));
        assert_eq!(clients_udp(None, None), Ok(at("127.0.0.1:0")));
        assert_eq!(
            clients_udp(Some("9000"), Some(cluster)),
            Ok(at("10.77.3.2:9000"))
        );
        assert_eq!(clients_udp(Some("0.0.0.0:5"), None), Ok(at("0.0.0.0:5")));
        assert_eq!(clients_udp(Some("off"), Some(cluster)), Ok(None));
        assert!(clients_udp(Some("bogus"), None).is_err());
    }
}
