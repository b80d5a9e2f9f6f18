//! `forkd vm migrate ID --host h1 --to h2`: live-migrates a VM to another
//! host of the cluster through the source host's API, and with `--wait`
//! follows it (`GET /v1/vms/{id}/migration`) to its end and prints the
//! report.

use super::target::{print, text, vm_path, Target};
use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM's id (vm-N).
    pub id: String,
    /// The destination host (a peer of the VM's host).
    #[arg(long)]
    pub to: String,
    /// Downtime budget of the pre-copy convergence rule, in ms.
    #[arg(long, default_value_t = 30)]
    pub downtime_ms: u64,
    /// Bandwidth cap in MiB/s (0: none).
    #[arg(long, default_value_t = 0)]
    pub bandwidth_mib_s: u64,
    /// `precopy` (postcopy and auto are not implemented yet).
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// Wait for the end, showing progress on stderr, then print the report.
    #[arg(long)]
    pub wait: bool,
    /// Longest `--wait` waits, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait_s: u64,
    #[command(flatten)]
    pub target: Target,
}

fn report_text(v: &Value) -> String {
    let r = &v["report"];
    let ms = |k: &str| {
        r[k].as_u64()
            .map_or("-".into(), |us| format!("{:.1}", us as f64 / 1e3))
    };
    let mut s = format!(
        "{} → {}: {}\n",
        text(&v["vm"]),
        text(&v["destination"]),
        text(&v["phase"])
    );
    if r.is_object() {
        s += &format!(
            "destination VM {}; pre-copy rounds: {} ({}); {} pages, {} bytes, {:.0} MiB/s\n",
            text(&r["destination_vm"]),
            text(&r["rounds"]),
            text(&r["stop_reason"]),
            text(&r["pages_sent"]),
            text(&r["bytes_sent"]),
            r["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
        );
        s += &format!(
            "downtime {} ms (pause {}, last round {} for {} pages, state {}, resume {}); total {} ms\n",
            ms("downtime_us"),
            ms("pause_us"),
            ms("last_round_us"),
            text(&r["last_round_pages"]),
            ms("state_us"),
            ms("resume_us"),
            ms("total_us"),
        );
    }
    if let Some(e) = v["error"].as_str() {
        s += &format!("error: {e}\n");
    }
    s
}

pub fn migrate(a: MigrateArgs) -> Result<()> {
    let api = a.target.endpoint()?;
    let path = vm_path(&a.id)?;
    let body = json!({
        "destination": a.to,
        "downtime_ms": a.downtime_ms,
        "bandwidth_mib_s": a.bandwidth_mib_s,
        "mode": a.mode,
    });
    let started = api.request("POST", &format!("{path}/migrate"), Some(&body))?;
    if !a.wait {
        print(a.target.json, &started, |v| {
            format!(
                "{} migrating to {}\n",
                text(&v["vm"]),
                text(&v["destination"])
            )
        });
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    let mut last = String::new();
    let status = loop {
        let v = api.request("GET", &format!("{path}/migration"), None)?;
        let line = format!(
            "{} round {}: {} MiB sent, {} dirty pages/s, estimated downtime {:.1} ms",
            text(&v["phase"]),
            text(&v["round"]),
            v["bytes_sent"].as_u64().unwrap_or(0) >> 20,
            text(&v["dirty_pages_per_s"]),
            v["estimated_downtime_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        );
        if line != last {
            eprintln!("forkd: {} {line}", a.id);
            last = line;
        }
        if matches!(
            v["phase"].as_str(),
            Some("committed" | "aborted" | "in_doubt")
        ) {
            break v;
        }
        if Instant::now() >= deadline {
            bail!("{} still migrating after {} s", a.id, a.wait_s);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    print(a.target.json, &status, report_text);
    if status["phase"] != "committed" {
        bail!(
            "the migration of {} did not commit: {}",
            a.id,
            text(&status["error"])
        );
    }
    Ok(())
}
