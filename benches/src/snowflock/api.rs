//! Talking to a host daemon: forkd's own HTTP client over the host's Unix
//! socket, with the calls the bench needs. Every poll is bounded in count
//! and time and checks for a stop signal.

use crate::cluster::{check_stop, nap};
use anyhow::{bail, Context, Result};
use forkd::api::client::Endpoint;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A host's API.
pub struct Api {
    pub host: String,
    ep: Endpoint,
}

/// How pages reach the clones (`"distribution"` of a fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Mode {
    Unicast,
    Multicast,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unicast => "unicast",
            Mode::Multicast => "multicast",
        }
    }
}

/// What a fork request was sent with.
#[derive(Debug, Clone, Copy)]
pub struct ForkKind {
    pub mode: Mode,
    pub heuristics: bool,
}

/// A fork the daemon accepted.
pub struct Forked {
    pub family: u64,
    /// Just before the request was sent (bench clock).
    pub at: Instant,
    /// The daemon took `distribution` and `heuristics`; false if it does
    /// not know them yet and the defaults (unicast, heuristics on) ran.
    pub kind_sent: bool,
}

impl Api {
    pub fn new(host: &str, ep: Endpoint) -> Api {
        Api {
            host: host.to_owned(),
            ep,
        }
    }

    fn at(&self, method: &str, path: &str) -> String {
        format!("{} {method} {path}", self.host)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.ep
            .request("GET", path, None)
            .with_context(|| self.at("GET", path))
    }

    /// GET that answers None on 404 (a route this daemon does not have).
    pub fn get_optional(&self, path: &str) -> Result<Option<Value>> {
        let r = self
            .ep
            .call("GET", path, None)
            .with_context(|| self.at("GET", path))?;
        match r.status {
            200 => Ok(Some(r.body)),
            404 => Ok(None),
            s => bail!("{}: status {s}: {}", self.at("GET", path), r.body),
        }
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let r = self
            .ep
            .call("DELETE", path, None)
            .with_context(|| self.at("DELETE", path))?;
        match r.status {
            204 | 404 => Ok(()),
            s => bail!("{}: status {s}: {}", self.at("DELETE", path), r.body),
        }
    }

    /// `POST /v1/vms` → the new VM's id.
    pub fn create_vm(&self, cmdline: &str, mem_mib: u64) -> Result<String> {
        let body = json!({"cmdline": cmdline, "mem_mib": mem_mib});
        let v = self
            .ep
            .request("POST", "/v1/vms", Some(&body))
            .with_context(|| self.at("POST", "/v1/vms"))?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("create answered without an id: {v}"))
    }

    /// Polls until the guest has printed its `zone: start` line (its second
    /// line; its tick clock starts right after it); the instant that poll
    /// saw it.
    pub fn wait_started(&self, id: &str, limit: Duration) -> Result<Instant> {
        let path = format!("/v1/vms/{id}");
        let t = Instant::now();
        loop {
            let v = self.get(&path)?;
            if v["console_lines"].as_u64().is_some_and(|n| n >= 2) {
                return Ok(Instant::now());
            }
            if v["state"] != "running" {
                bail!("{id} ended before it started its zone: {v}");
            }
            if t.elapsed() > limit {
                bail!("{id} printed no `zone: start` line within {limit:?}: {v}");
            }
            nap(Duration::from_millis(1))?;
        }
    }

    /// `POST /v1/vms/{id}/fork` with `"spread"` and the contract's
    /// `"distribution"`/`"heuristics"`. A daemon that predates them (400,
    /// unknown field) is asked again without them if the defaults were
    /// wanted; otherwise that is an error. A 409 "try again" (agent not
    /// started) is retried for up to 10 s.
    pub fn fork(&self, id: &str, clones: u64, spread: &[String], kind: ForkKind) -> Result<Forked> {
        let path = format!("/v1/vms/{id}/fork");
        let mut body = json!({
            "clones": clones,
            "spread": spread,
            "distribution": kind.mode.as_str(),
            "heuristics": kind.heuristics,
        });
        let mut kind_sent = true;
        let t = Instant::now();
        loop {
            check_stop()?;
            let at = Instant::now();
            let r = self
                .ep
                .call("POST", &path, Some(&body))
                .with_context(|| self.at("POST", &path))?;
            let msg = r.body["error"].as_str().unwrap_or_default().to_owned();
            match r.status {
                200 => {
                    let family = r.body["family"]
                        .as_u64()
                        .with_context(|| format!("fork answered without a family: {}", r.body))?;
                    return Ok(Forked {
                        family,
                        at,
                        kind_sent,
                    });
                }
                400 if kind_sent && msg.contains("unknown field") => {
                    if kind.mode != Mode::Unicast || !kind.heuristics {
                        bail!(
                            "{}: this daemon does not take `distribution`/`heuristics` yet \
                             ({msg}); only unicast with heuristics on can run",
                            self.at("POST", &path)
                        );
                    }
                    eprintln!(
                        "snowflock: the daemon does not take `distribution`/`heuristics` yet; \
                         forking with its defaults (unicast, heuristics on)"
                    );
                    body = json!({"clones": clones, "spread": spread});
                    kind_sent = false;
                }
                409 if msg.contains("try again") && t.elapsed() < Duration::from_secs(10) => {
                    nap(Duration::from_millis(5))?;
                }
                s => bail!("{}: status {s}: {msg}", self.at("POST", &path)),
            }
        }
    }

    /// `GET /v1/memserver` (the contract's counters); None if the daemon
    /// has no such route yet.
    pub fn memserver(&self) -> Result<Option<Value>> {
        self.get_optional("/v1/memserver")
    }

    /// The console lines kept for a VM.
    pub fn console(&self, id: &str) -> Result<Vec<String>> {
        let v = self.get(&format!("/v1/vms/{id}/console"))?;
        let lines = v["lines"]
            .as_array()
            .with_context(|| format!("console of {id} without lines: {v}"))?;
        Ok(lines
            .iter()
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect())
    }

    /// Deletes every VM of this host that belongs to `family` (clones
    /// hosted for a parent elsewhere keep their report until deleted).
    pub fn delete_family_vms(&self, family: u64) -> Result<()> {
        let v = self.get("/v1/vms")?;
        for vm in v["vms"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if vm["family"].as_u64() == Some(family) {
                if let Some(id) = vm["id"].as_str() {
                    self.delete(&format!("/v1/vms/{id}"))?;
                }
            }
        }
        Ok(())
    }
}

/// The family `family` in a `GET /v1/vms/{id}` answer.
pub fn find_family(vm: &Value, family: u64) -> Option<&Value> {
    vm["families"]
        .as_array()?
        .iter()
        .find(|f| f["family"].as_u64() == Some(family))
}

/// Every clone of the family has ended (none running, the count at 0).
pub fn family_ended(fam: &Value) -> bool {
    fam["running"].as_u64() == Some(0)
        && fam["clones"]
            .as_array()
            .is_some_and(|cs| cs.iter().all(|c| c["state"] != "running"))
}

/// The tick the parent saw the host's fork before (its console line).
pub fn fork_tick(lines: &[String]) -> Option<u64> {
    lines.iter().find_map(|l| {
        l.strip_prefix("zone: forked by the host before tick ")?
            .split(':')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_end_when_no_clone_runs() {
        let vm = json!({"families": [
            {"family": 7, "running": 0, "clones": [{"state": "exited"}, {"state": "failed"}]},
            {"family": 8, "running": 1, "clones": [{"state": "running"}]}
        ]});
        assert!(family_ended(find_family(&vm, 7).unwrap()));
        assert!(!family_ended(find_family(&vm, 8).unwrap()));
        assert!(find_family(&vm, 9).is_none());
        assert!(!family_ended(&json!({"running": 0})));
    }

    #[test]
    fn the_fork_tick_comes_from_the_parents_line() {
        let lines = [
            "zone: start ticks=4".to_owned(),
            "zone: forked by the host before tick 40: clone=0".to_owned(),
        ];
        assert_eq!(fork_tick(&lines), Some(40));
        assert_eq!(fork_tick(&lines[..1]), None);
    }
}
