//! The fork calls of a host's API (the shared [`Api`] has the rest). Every
//! poll is bounded in count and time and checks for a stop signal.

use crate::cluster::{check_stop, nap};
use anyhow::{bail, Context, Result};
pub use bench_shared::api::Api;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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

/// The fork calls of a host's API.
pub trait ForkCalls {
    fn fork(&self, id: &str, clones: u64, spread: &[String], kind: ForkKind) -> Result<Forked>;
    fn memserver(&self) -> Result<Option<Value>>;
    fn delete_family_vms(&self, family: u64) -> Result<()>;
}

impl ForkCalls for Api {
    /// `POST /v1/vms/{id}/fork` with `"spread"` and the contract's
    /// `"distribution"`/`"heuristics"`. A daemon that predates them (400,
    /// unknown field) is asked again without them if the defaults were
    /// wanted; otherwise that is an error. A 409 "try again" (agent not
    /// started) is retried for up to 10 s.
    fn fork(&self, id: &str, clones: u64, spread: &[String], kind: ForkKind) -> Result<Forked> {
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
            let r = self.call("POST", &path, Some(&body))?;
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
    fn memserver(&self) -> Result<Option<Value>> {
        self.get_optional("/v1/memserver")
    }

    /// Deletes every VM of this host that belongs to `family` (clones
    /// hosted for a parent elsewhere keep their report until deleted).
    fn delete_family_vms(&self, family: u64) -> Result<()> {
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
