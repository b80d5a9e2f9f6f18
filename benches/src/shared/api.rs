//! Talking to a host daemon: forkd's own HTTP client over the host's Unix
//! socket, with the calls every cluster bench needs. Every poll is bounded
//! in count and time and checks for a stop signal.

use crate::cluster::nap;
use anyhow::{bail, Context, Result};
use forkd::api::client::{Endpoint, Reply};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A host's API.
pub struct Api {
    pub host: String,
    ep: Endpoint,
}

impl Api {
    pub fn new(host: &str, ep: Endpoint) -> Api {
        Api {
            host: host.to_owned(),
            ep,
        }
    }

    /// "host METHOD path", for error messages.
    pub fn at(&self, method: &str, path: &str) -> String {
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

    /// Any call; the status and body as they came.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        self.ep
            .call(method, path, body)
            .with_context(|| self.at(method, path))
    }
}
