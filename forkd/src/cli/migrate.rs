//! `forkd vm migrate ID --host h1 --to h2`: live-migrates a VM to another
//! host of the cluster through the source host's API, and with `--wait`
//! follows it (`GET /v1/vms/{id}/migration`) to its end and prints the
//! report.

use super::migrate_progress::Display;
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
    /// `precopy`, `postcopy` (resume on the destination at once, fetch
    /// the rest from here) or `auto` (pre-copy, post-copy if it cannot
    /// converge). A clone migrates by pre-copy only.
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// Wait for the end, showing progress on stderr (a bar on a terminal,
    /// lines otherwise; nothing with --json), then print the report.
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
            "downtime {} ms: pause {} + last round {} ({} pages) + state {} + destination resume {}\n",
            ms("downtime_us"),
            ms("pause_us"),
            ms("last_round_us"),
            text(&r["last_round_pages"]),
            ms("state_us"),
            ms("resume_us"),
        );
        s += &format!(
            "total {} ms; {} pre-copy rounds ({}); {} pages, {:.1} MiB sent at {:.0} MiB/s; on {} as {}\n",
            ms("total_us"),
            text(&r["rounds"]),
            text(&r["stop_reason"]),
            text(&r["pages_sent"]),
            r["bytes_sent"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            r["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
            text(&v["destination"]),
            text(&r["destination_vm"]),
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
    let mut display = Display::new(&a.id, a.target.json);
    let status = loop {
        let v = api.request("GET", &format!("{path}/migration"), None)?;
        if matches!(
            v["phase"].as_str(),
            Some("committed" | "aborted" | "in_doubt")
        ) {
            display.finish(&v);
            break v;
        }
        display.update(&v);
        if Instant::now() >= deadline {
            display.finish(&v);
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
