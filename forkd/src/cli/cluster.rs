//! `forkd cluster up|status|down`: a local cluster on this machine (see
//! `crate::cluster`).

use crate::cluster::{local, state, status};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Make N hosts h1..hN (a network namespace each, a veth into a bridge
    /// in a namespace of its own, an address on 10.77.X.0/24) and start
    /// `forkd serve` in each.
    Up(UpArgs),
    /// List the hosts and the state of their daemons.
    Status(StatusArgs),
    /// Remove everything the cluster is made of (idempotent).
    Down(Which),
}

#[derive(Args, Debug)]
pub struct Which {
    /// Cluster name (1-12 of a-z, 0-9).
    #[arg(long, default_value = "local")]
    pub name: String,
    /// The cluster's directory (state file, token, sockets, logs)
    /// [default: /run/forkd/clusters/NAME].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many hosts.
    #[arg(long)]
    pub hosts: u32,
    /// TCP port of every host's API (on the host's address).
    #[arg(long, default_value_t = status::DEFAULT_PORT)]
    pub port: u16,
    /// Print the cluster's status as JSON when it is up.
    #[arg(long)]
    pub json: bool,
    /// Every host runs a policy controller candidate (one is elected).
    #[arg(long)]
    pub policy: bool,
    /// The leading controller decides this often.
    #[arg(long, requires = "policy", value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub policy_period_ms: Option<u64>,
    /// The policy's thresholds (JSON), passed to every host (checked
    /// here first: nothing starts on a bad one).
    #[arg(long, requires = "policy", value_parser = checked_policy)]
    pub policy_config: Option<String>,
    /// The cores each host offers its zones, as the policy sees it (the
    /// hosts of a local cluster share this machine's CPUs).
    #[arg(long)]
    pub cpu_capacity: Option<f64>,
    /// Most VMs each host's daemon registers at once (its `--max-vms`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_vms: Option<u64>,
    /// Most clones one fork may ask for, per host (its `--max-clones`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_clones: Option<u64>,
    /// Each host's dirty-rate sampling: a window every this often (0:
    /// none; see `forkd serve --help`).
    #[arg(long)]
    pub dirty_sample_every_ms: Option<u64>,
    /// How long each dirty-rate window lasts.
    #[arg(long)]
    pub dirty_window_ms: Option<u64>,
    #[command(flatten)]
    pub which: Which,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub which: Which,
}

impl Which {
    fn dir(&self) -> Result<PathBuf> {
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(|| state::default_dir(&self.name));
        if dir.is_absolute() {
            return Ok(dir);
        }
        Ok(std::env::current_dir()
            .context("cannot resolve --dir")?
            .join(dir))
    }
}

fn print_status(name: &str, dir: &std::path::Path, json: bool) -> Result<status::ClusterStatus> {
    let st = status::status(name, dir)?;
    if json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        print!("{}", status::table(&st));
    }
    Ok(st)
}

/// `--policy-config` as given, once it reads as a valid configuration.
fn checked_policy(s: &str) -> Result<String, String> {
    super::parse_policy(s).map(|_| s.to_owned())
}

/// What `up` passes on to every host's `forkd serve`.
fn serve_args(a: &UpArgs) -> Vec<String> {
    let mut v = Vec::new();
    if a.policy {
        v.push("--policy".to_owned());
    }
    if let Some(ms) = a.policy_period_ms {
        v.extend(["--policy-period-ms".to_owned(), ms.to_string()]);
    }
    if let Some(p) = &a.policy_config {
        v.extend(["--policy-config".to_owned(), p.clone()]);
    }
    if let Some(c) = a.cpu_capacity {
        v.extend(["--cpu-capacity".to_owned(), c.to_string()]);
    }
    if let Some(n) = a.max_vms {
        v.extend(["--max-vms".to_owned(), n.to_string()]);
    }
    if let Some(n) = a.max_clones {
        v.extend(["--max-clones".to_owned(), n.to_string()]);
    }
    if let Some(ms) = a.dirty_sample_every_ms {
        v.extend(["--dirty-sample-every-ms".to_owned(), ms.to_string()]);
    }
    if let Some(ms) = a.dirty_window_ms {
        v.extend(["--dirty-window-ms".to_owned(), ms.to_string()]);
    }
    v
}

pub fn run(cmd: ClusterCommand) -> Result<ExitCode> {
    match cmd {
        ClusterCommand::Up(a) => {
            let dir = a.which.dir()?;
            let forkd = std::env::current_exe().context("cannot find the forkd binary")?;
            let s = local::up(&local::UpOptions {
                name: a.which.name.clone(),
                dir: dir.clone(),
                hosts: a.hosts,
                port: a.port,
                forkd,
                serve_args: serve_args(&a),
            })?;
            if !a.json {
                eprintln!(
                    "forkd: cluster {} is up: {} hosts on {}; TCP needs the token in {}",
                    s.name,
                    s.hosts.len(),
                    s.subnet,
                    s.token_file.display()
                );
            }
            print_status(&s.name, &dir, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Status(a) => {
            print_status(&a.which.name, &a.which.dir()?, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Down(w) => {
            let r = local::down(&w.name, &w.dir()?)?;
            for n in &r.notes {
                eprintln!("forkd: {n}");
            }
            if r.is_empty() {
                eprintln!("forkd: cluster {}: nothing to remove", w.name);
            } else {
                eprintln!(
                    "forkd: cluster {} is down: stopped {} processes, removed {} namespaces and {} files",
                    w.name,
                    r.stopped.len(),
                    r.namespaces.len(),
                    r.files.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
