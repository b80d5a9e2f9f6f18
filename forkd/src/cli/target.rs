//! Which daemon a `forkd vm` command talks to (`--host` of the local
//! cluster, `--socket`, or `--url` with `--token-file`) and how answers are
//! printed (`--json`, or text for people): shared by the `vm` commands.

use crate::api::client::Endpoint;
use crate::cluster::state::{self, ClusterState};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct Target {
    /// A host of the local cluster (h1, h2, ...).
    #[arg(long, conflicts_with_all = ["socket", "url"])]
    pub host: Option<String>,
    /// The local cluster `--host` is looked up in.
    #[arg(long, default_value = "local")]
    pub cluster: String,
    /// That cluster's directory [default: /run/forkd/clusters/NAME].
    #[arg(long)]
    pub cluster_dir: Option<PathBuf>,
    /// The daemon's Unix socket.
    #[arg(long, conflicts_with = "url")]
    pub socket: Option<PathBuf>,
    /// The daemon's TCP API: IP:PORT (or http://IP:PORT).
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer token for `--url` (a file holding it).
    #[arg(long, requires = "url")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Target {
    pub(super) fn endpoint(&self) -> Result<Endpoint> {
        if let Some(host) = &self.host {
            state::check_name(&self.cluster)?;
            let dir = self
                .cluster_dir
                .clone()
                .unwrap_or_else(|| state::default_dir(&self.cluster));
            let st = ClusterState::load(&dir)?.with_context(|| {
                format!(
                    "no local cluster '{}' in {} (forkd cluster up --name {})",
                    self.cluster,
                    dir.display(),
                    self.cluster
                )
            })?;
            let h = st.hosts.iter().find(|h| &h.name == host).with_context(|| {
                let names: Vec<_> = st.hosts.iter().map(|h| h.name.as_str()).collect();
                format!(
                    "cluster '{}' has no host '{host}' (hosts: {})",
                    st.name,
                    names.join(", ")
                )
            })?;
            return Ok(Endpoint::Unix(h.socket.clone()));
        }
        if let Some(url) = &self.url {
            let text = url.trim_start_matches("http://").trim_end_matches('/');
            let addr: SocketAddr = text
                .parse()
                .with_context(|| format!("--url '{url}': expected IP:PORT"))?;
            let token = match &self.token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read the token file {}", f.display()))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            return Ok(Endpoint::Tcp { addr, token });
        }
        Ok(Endpoint::Unix(
            self.socket
                .clone()
                .unwrap_or_else(crate::api::default_socket_path),
        ))
    }
}

/// `vm-N` or `N`, as the API path wants it.
pub(super) fn vm_path(id: &str) -> Result<String> {
    let n = id.strip_prefix("vm-").unwrap_or(id);
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        bail!("'{id}' is not a VM id (vm-N)");
    }
    Ok(format!("/v1/vms/vm-{n}"))
}

pub(super) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn print(json: bool, v: &Value, human: impl FnOnce(&Value) -> String) {
    if json {
        println!("{v}");
    } else {
        print!("{}", human(v));
    }
}
