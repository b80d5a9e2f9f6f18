//! forkd's side: a zone guest booted on h1 through its API, migrated to h2
//! (`POST /v1/vms/{id}/migrate`, then `GET /v1/vms/{id}/migration` until
//! the phase is final), and its last line read from h2's console. Every VM
//! the bench makes is deleted when its guard drops, wherever it runs by
//! then; every poll is bounded and checks for a stop signal.

use anyhow::{bail, Context, Result};
use bench_shared::api::Api;
use bench_shared::cluster::{check_stop, nap};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How often a migration's status is read.
const POLL: Duration = Duration::from_millis(5);

/// A VM of the bench on one of the hosts; deleted on drop.
pub struct Guest<'a> {
    apis: &'a [Api],
    pub host: usize,
    pub id: String,
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.apis.get(self.host) {
            if let Err(e) = h.delete(&format!("/v1/vms/{}", self.id)) {
                eprintln!("migrate: deleting {} on {}: {e:#}", self.id, h.host);
            }
        }
    }
}

impl<'a> Guest<'a> {
    /// Boots `cmdline` on host `host`; the guard and the instant its
    /// `zone: start` line was seen.
    pub fn boot(
        apis: &'a [Api],
        host: usize,
        cmdline: &str,
        mem_mib: u64,
    ) -> Result<(Self, Instant)> {
        let api = apis.get(host).context("no such host")?;
        let id = api.create_vm(cmdline, mem_mib)?;
        let g = Guest { apis, host, id };
        let t = api.wait_started(&g.id, Duration::from_secs(30))?;
        Ok((g, t))
    }

    fn api(&self) -> &'a Api {
        &self.apis[self.host]
    }

    /// Waits up to `limit` for the guest to end; its last line (exit 0
    /// and a done line, else an error).
    pub fn wait_done(&self, limit: Duration) -> Result<String> {
        let path = format!("/v1/vms/{}", self.id);
        let t = Instant::now();
        loop {
            let v = self.api().get(&path)?;
            if v["state"] != "running" {
                let line = v["last_line"].as_str().unwrap_or_default().to_owned();
                if v["exit"]["code"].as_i64() != Some(0) || !line.starts_with("zone: done") {
                    bail!("{} on {} ended badly: {v}", self.id, self.api().host);
                }
                return Ok(line);
            }
            if t.elapsed() > limit {
                bail!(
                    "{} on {} still runs after {limit:?}",
                    self.id,
                    self.api().host
                );
            }
            nap(Duration::from_millis(10))?;
        }
    }
}

/// Start line → done line of a run of `cmdline` on h1.
pub fn time_run(apis: &[Api], cmdline: &str, mem_mib: u64, limit: Duration) -> Result<Duration> {
    let (g, t0) = Guest::boot(apis, 0, cmdline, mem_mib)?;
    g.wait_done(limit)?;
    Ok(t0.elapsed())
}

/// How a migration was asked for.
#[derive(Debug, Clone)]
pub struct Ask<'s> {
    pub mode: &'s str,
    pub downtime_ms: u64,
    pub bandwidth_mib_s: u64,
    /// Bound on request → final phase.
    pub budget: Duration,
}

/// A migration's end as the source saw it.
#[derive(Debug, Default, Clone)]
pub struct Moved {
    pub phase: String,
    pub status: Value,
    /// The last `dirty_pages_per_s` seen while it ran.
    pub dirty_pages_per_s: Option<u64>,
    pub error: Option<String>,
}

impl Moved {
    pub fn report(&self) -> Option<&Value> {
        self.status.get("report")
    }
    pub fn downtime_ms(&self) -> Option<f64> {
        Some(self.report()?["downtime_us"].as_f64()? / 1e3)
    }
    pub fn total_ms(&self) -> Option<f64> {
        Some(self.report()?["total_us"].as_f64()? / 1e3)
    }
}

/// What `POST …/migrate` answered.
pub enum Started {
    Yes,
    /// 422 about the mode: this daemon does not take it (yet).
    ModeRefused(String),
}

/// Migrates the guest to host `to`; on commit the guard follows it.
pub fn migrate(g: &mut Guest, to: usize, ask: &Ask) -> Result<(Started, Moved)> {
    let dest = g.apis.get(to).context("no such host")?.host.clone();
    let path = format!("/v1/vms/{}/migrate", g.id);
    let body = json!({
        "destination": dest,
        "downtime_ms": ask.downtime_ms,
        "bandwidth_mib_s": ask.bandwidth_mib_s,
        "mode": ask.mode,
    });
    let r = g.api().call("POST", &path, Some(&body))?;
    let msg = r.body["error"].as_str().unwrap_or_default().to_owned();
    match r.status {
        202 => {}
        422 if msg.contains("mode") => return Ok((Started::ModeRefused(msg), Moved::default())),
        s => bail!("{}: status {s}: {}", g.api().at("POST", &path), r.body),
    }
    let status = format!("/v1/vms/{}/migration", g.id);
    let t = Instant::now();
    let mut rate = None;
    let v = loop {
        check_stop()?;
        let v = g.api().get(&status)?;
        let phase = v["phase"].as_str().unwrap_or_default();
        if matches!(phase, "committed" | "aborted" | "in_doubt") {
            break v;
        }
        if let Some(r) = v["dirty_pages_per_s"].as_u64().filter(|&r| r > 0) {
            rate = Some(r);
        }
        if t.elapsed() > ask.budget {
            let _ = g.api().delete(&status);
            bail!(
                "the migration of {} did not end within {:?}: {v}",
                g.id,
                ask.budget
            );
        }
        std::thread::sleep(POLL);
    };
    let phase = v["phase"].as_str().unwrap_or_default().to_owned();
    if phase == "committed" {
        let vm = v["report"]["destination_vm"]
            .as_str()
            .with_context(|| format!("a committed migration without destination_vm: {v}"))?;
        g.id = vm.to_owned();
        g.host = to;
    }
    let error = match phase.as_str() {
        "committed" => None,
        _ => Some(format!(
            "{phase}: {}",
            v["error"].as_str().unwrap_or_default()
        )),
    };
    Ok((
        Started::Yes,
        Moved {
            phase,
            status: v,
            dirty_pages_per_s: rate,
            error,
        },
    ))
}
