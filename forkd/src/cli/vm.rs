//! `forkd vm create|list|get|console|fork|migrate|delete`: a client of one host's
//! API. The host is a name of the local cluster (`--host h1`), a Unix
//! socket (`--socket PATH`), or a TCP address with a token (`--url
//! IP:PORT --token-file F`); by default the local daemon's socket. Tables
//! for people, `--json` for scripts (the API's own JSON).

use super::target::{print, text, vm_path, Target};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot a VM on the host; prints it with its id.
    Create(CreateArgs),
    /// The host's VMs (clones included) with state, exit and last line.
    List(Target),
    /// One VM: state, exit, last line and its fork families.
    Get(IdArgs),
    /// What the VM's guest printed.
    Console(IdArgs),
    /// Fork a running VM into clones (host-initiated).
    Fork(ForkArgs),
    /// Live-migrate a running VM (or a clone) to another host.
    Migrate(super::migrate::MigrateArgs),
    /// Stop a VM (and its clones) and forget it.
    Delete(IdArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The zone guest's cmdline.
    #[arg(long)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    #[arg(long)]
    pub name: Option<String>,
    /// Guest ELF (on the daemon's machine); default: the zone guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// How this VM's forks send pages to their clones (default unicast).
    #[arg(long, value_enum)]
    pub distribution: Option<crate::fork::mcdist::Distribution>,
    /// Page avoidance and push/prefetch in this VM's forks (default on).
    #[arg(long, value_enum)]
    pub heuristics: Option<Switch>,
    #[command(flatten)]
    pub target: Target,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    fn on(self) -> bool {
        self == Switch::On
    }
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// The VM's id (vm-N).
    pub id: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// The VM's id (vm-N).
    pub id: String,
    /// How many clones.
    #[arg(long)]
    pub clones: u64,
    /// Share the clones out evenly over these hosts of the cluster
    /// (`h1,h2,...`; the VM's own host may be one of them).
    #[arg(long, value_delimiter = ',', conflicts_with = "place")]
    pub spread: Vec<String>,
    /// Exactly where: `h1=8,h2=8,...` (counts add up to --clones).
    #[arg(long, value_delimiter = ',')]
    pub place: Vec<String>,
    /// How pages reach the clones (default: the VM's, unicast unless it
    /// was created with another).
    #[arg(long, value_enum)]
    pub distribution: Option<crate::fork::mcdist::Distribution>,
    /// Page avoidance and push/prefetch of the allocated pages (default:
    /// the VM's, on).
    #[arg(long, value_enum)]
    pub heuristics: Option<Switch>,
    /// Wait until the family has ended, showing progress, then print its
    /// report.
    #[arg(long)]
    pub wait: bool,
    /// Longest `--wait` waits, in seconds.
    #[arg(long, default_value_t = 600)]
    pub wait_s: u64,
    #[command(flatten)]
    pub target: Target,
}

fn exit_text(v: &Value) -> String {
    if v["exit"].is_null() {
        return "-".into();
    }
    format!(
        "{} ({})",
        text(&v["exit"]["code"]),
        text(&v["exit"]["reason"])
    )
}

/// A table with a header row; columns sized to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn vm_rows(vms: &[Value]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                text(&v["id"]),
                text(&v["name"]),
                text(&v["state"]),
                exit_text(v),
                text(&v["last_line"]),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "EXIT", "LAST LINE"], &rows)
}

fn family_rows(families: &[Value]) -> String {
    let mut out = String::new();
    for f in families {
        out += &format!(
            "family {}: {} clones granted, {} running\n",
            text(&f["family"]),
            text(&f["clones_granted"]),
            text(&f["running"])
        );
        let rows: Vec<Vec<String>> = f["clones"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| {
                vec![
                    text(&c["clone_id"]),
                    text(&c["state"]),
                    exit_text(c),
                    c["host"].as_str().unwrap_or("here").to_owned(),
                    text(&c["ip"]),
                    text(&c["mac"]),
                    c["last_line"]
                        .as_str()
                        .or(c["error"].as_str())
                        .unwrap_or("-")
                        .to_owned(),
                ]
            })
            .collect();
        out += &table(
            &["CLONE", "STATE", "EXIT", "HOST", "IP", "MAC", "LAST LINE"],
            &rows,
        );
    }
    out
}

/// Clones of `family` by state: (started, running, ended).
fn progress(detail: &Value, family: &Value) -> Option<(usize, usize, usize)> {
    let f = detail["families"]
        .as_array()?
        .iter()
        .find(|f| f["family"] == *family)?;
    let clones = f["clones"].as_array()?;
    let running = clones.iter().filter(|c| c["state"] == "running").count();
    Some((clones.len(), running, clones.len() - running))
}

fn fork(a: ForkArgs) -> Result<()> {
    let api = a.target.endpoint()?;
    let path = vm_path(&a.id)?;
    let mut body = json!({"clones": a.clones});
    if let Some(d) = a.distribution {
        body["distribution"] = json!(d.to_string());
    }
    if let Some(h) = a.heuristics {
        body["heuristics"] = json!(h.on());
    }
    if !a.spread.is_empty() {
        body["spread"] = json!(a.spread);
    }
    if !a.place.is_empty() {
        let mut hosts = serde_json::Map::new();
        for p in &a.place {
            let (h, n) = p
                .split_once('=')
                .with_context(|| format!("--place '{p}': expected HOST=COUNT"))?;
            let n: u64 = n
                .parse()
                .with_context(|| format!("--place '{p}': '{n}' is not a count"))?;
            hosts.insert(h.to_owned(), json!(n));
        }
        body["hosts"] = Value::Object(hosts);
    }
    let forked = api.request("POST", &format!("{path}/fork"), Some(&body))?;
    if !a.wait {
        print(a.target.json, &forked, |v| {
            format!(
                "{} forked: family {}, clones {}\n",
                a.id,
                text(&v["family"]),
                text(&v["clones"])
            )
        });
        return Ok(());
    }
    let family = forked["family"].clone();
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    let mut last = None;
    let detail = loop {
        let detail = api.request("GET", &path, None)?;
        let now = progress(&detail, &family);
        if now != last {
            if let Some((started, running, ended)) = now {
                eprintln!("forkd: family {family}: {started} clones started, {running} running, {ended} ended");
            }
            last = now;
        }
        if matches!(now, Some((_, 0, _))) {
            break detail;
        }
        if Instant::now() >= deadline {
            bail!(
                "family {family} still has clones running after {} s",
                a.wait_s
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = detail["families"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["family"] == family))
        .cloned()
        .unwrap_or(Value::Null);
    print(a.target.json, &report, |f| {
        family_rows(std::slice::from_ref(f))
    });
    Ok(())
}

/// Runs one `forkd vm` command.
pub fn run(cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Create(a) => {
            let api = a.target.endpoint()?;
            let mut body = json!({"cmdline": a.cmdline, "mem_mib": a.mem, "vcpus": a.vcpus});
            if let Some(n) = a.name {
                body["name"] = json!(n);
            }
            if let Some(g) = a.guest {
                body["guest"] = json!(g);
            }
            if let Some(d) = a.distribution {
                body["distribution"] = json!(d.to_string());
            }
            if let Some(h) = a.heuristics {
                body["heuristics"] = json!(h.on());
            }
            let v = api.request("POST", "/v1/vms", Some(&body))?;
            print(a.target.json, &v, |v| {
                format!("{} {}\n", text(&v["id"]), text(&v["state"]))
            });
        }
        VmCommand::List(t) => {
            let v = t.endpoint()?.request("GET", "/v1/vms", None)?;
            print(t.json, &v, |v| {
                vm_rows(v["vms"].as_array().map(Vec::as_slice).unwrap_or_default())
            });
        }
        VmCommand::Get(a) => {
            let v = a
                .target
                .endpoint()?
                .request("GET", &vm_path(&a.id)?, None)?;
            print(a.target.json, &v, |v| {
                let mut s = vm_rows(std::slice::from_ref(v));
                s += &format!("cmdline: {}\n", text(&v["cmdline"]));
                s + &family_rows(
                    v["families"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                )
            });
        }
        VmCommand::Console(a) => {
            let path = format!("{}/console", vm_path(&a.id)?);
            let v = a.target.endpoint()?.request("GET", &path, None)?;
            print(a.target.json, &v, |v| {
                v["lines"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|l| text(l) + "\n")
                    .collect()
            });
        }
        VmCommand::Fork(a) => fork(a)?,
        VmCommand::Migrate(a) => super::migrate::migrate(a)?,
        VmCommand::Delete(a) => {
            a.target
                .endpoint()?
                .request("DELETE", &vm_path(&a.id)?, None)?;
            if a.target.json {
                println!("{}", json!({"deleted": a.id}));
            } else {
                println!("{} deleted", a.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
