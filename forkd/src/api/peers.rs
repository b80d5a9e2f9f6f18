//! The daemon's peers (`forkd serve --name hI --peer NAME=IP:PORT ...`):
//! the other hosts it may place clones on, reached over their TCP API with
//! the cluster's bearer token. Implements the fork layer's
//! [`CloneHosts`] with a small blocking HTTP/1.1 client (one request per
//! connection, bounded connect/read times and response size), and turns a
//! fork request's placement into a [`RemotePlan`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::fork::envelope::{envelope_key, to_hex, MAX_HOST_NAME};
use crate::fork::remote::{
    spread_counts, CloneHosts, DefaultPlacement, RemoteClone, RemoteCloneState, RemoteError,
    RemoteFamily, RemotePlan,
};

use super::client::{Bounds, Endpoint};
use super::error::ApiError;
use super::types::{FamilyStatus, ForkVm, Placement, PostFamily};
use crate::errors::chain;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Building a host's clones answers well within this.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// A status poll must answer quickly (the watcher polls every 50 ms).
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest response read from a peer.
const MAX_RESPONSE: u64 = 4 << 20;

/// `NAME=IP:PORT`.
pub fn parse_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=IP:PORT (e.g. h2=10.77.1.2:7070)"))?;
    check_name(name)?;
    let addr = addr
        .parse()
        .map_err(|_| format!("'{addr}': expected IP:PORT"))?;
    Ok((name.to_owned(), addr))
}

/// A host name: 1..=64 of `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host name '{name}': 1..={MAX_HOST_NAME} letters, digits, '.', '_' or '-'"
        ))
    }
}

pub struct Peers {
    name: String,
    peers: BTreeMap<String, SocketAddr>,
    token: Vec<u8>,
    key: [u8; 32],
}

impl Peers {
    pub fn new(name: String, peers: Vec<(String, SocketAddr)>, token: &[u8]) -> Peers {
        Peers {
            name,
            peers: peers.into_iter().collect(),
            token: token.to_vec(),
            key: envelope_key(token),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This host's share of the clone identity pool: its place among the
    /// sorted names of itself and its peers, and how many they are.
    pub fn share(&self) -> (usize, usize) {
        let part = self.peers.keys().filter(|p| **p < self.name).count();
        let parts = self.peers.keys().filter(|p| **p != self.name).count() + 1;
        (part, parts)
    }

    pub(super) fn addr(&self, host: &str) -> Result<SocketAddr, RemoteError> {
        self.peers
            .get(host)
            .copied()
            .ok_or_else(|| RemoteError::UnknownHost(host.to_owned()))
    }

    fn known(&self, host: &str) -> bool {
        host == self.name || self.peers.contains_key(host)
    }

    /// One request to `host` (the API's own client, with the cluster's
    /// token); the status and body.
    pub(super) fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), RemoteError> {
        let endpoint = Endpoint::Tcp {
            addr: self.addr(host)?,
            token: Some(String::from_utf8_lossy(&self.token).into_owned()),
        };
        let bounds = Bounds {
            connect: CONNECT_TIMEOUT,
            total: timeout,
            max_response: MAX_RESPONSE,
        };
        endpoint
            .exchange(method, path, body.unwrap_or(b""), &bounds)
            .map_err(|e| RemoteError::Transport {
                host: host.to_owned(),
                why: chain(&e),
            })
    }

    pub(super) fn refused(host: &str, status: u16, body: &[u8]) -> RemoteError {
        let error = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        RemoteError::Refused {
            host: host.to_owned(),
            status,
            error,
        }
    }

    /// A VM's default placement for its guest's forks (`"placement"` at
    /// create): the names must be known; counts are checked at each fork.
    pub fn default_placement(
        self: &Arc<Self>,
        p: &Placement,
    ) -> Result<Option<DefaultPlacement>, ApiError> {
        let req = ForkVm {
            clones: match (&p.hosts, &p.spread) {
                (Some(h), _) => h.values().fold(0u64, |a, n| a.saturating_add(*n)),
                (None, Some(s)) => s.len() as u64,
                (None, None) => 0,
            },
            hosts: p.hosts.clone(),
            spread: p.spread.clone(),
            distribution: None,
            heuristics: None,
        };
        let counts = placement_counts(&req, |h| self.known(h))?;
        Ok(counts.map(|counts| DefaultPlacement {
            hosts: self.clone() as Arc<dyn CloneHosts>,
            counts,
        }))
    }

    /// The placement of a fork request: `None` if every clone stays here.
    pub fn plan(self: &Arc<Self>, req: &ForkVm) -> Result<Option<RemotePlan>, ApiError> {
        let counts = placement_counts(req, |h| self.known(h))?;
        let Some(counts) = counts else {
            return Ok(None);
        };
        let local = counts.get(&self.name).copied().unwrap_or(0);
        let remote: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(h, n)| *h != self.name && *n > 0)
            .collect();
        if remote.is_empty() {
            return Ok(None);
        }
        Ok(Some(RemotePlan {
            hosts: self.clone() as Arc<dyn CloneHosts>,
            local,
            remote,
        }))
    }
}

/// Checks a placement and gives each host its clone count (`None`: no
/// placement, all local). Unknown hosts and counts that do not add up are
/// 422; both `hosts` and `spread`, or malformed names, 400.
pub fn placement_counts(
    req: &ForkVm,
    known: impl Fn(&str) -> bool,
) -> Result<Option<BTreeMap<String, u64>>, ApiError> {
    let unknown = |h: &str| ApiError::Placement(format!("unknown host '{h}'"));
    match (&req.hosts, &req.spread) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give either \"hosts\" or \"spread\", not both".into(),
        )),
        (Some(hosts), None) => {
            let mut sum = 0u64;
            for (h, n) in hosts {
                check_name(h).map_err(ApiError::BadRequest)?;
                if !known(h) {
                    return Err(unknown(h));
                }
                sum = sum.saturating_add(*n);
            }
            if sum != req.clones {
                return Err(ApiError::Placement(format!(
                    "the hosts' counts add up to {sum}, but {} clones were asked for",
                    req.clones
                )));
            }
            Ok(Some(hosts.clone()))
        }
        (None, Some(spread)) => {
            if spread.is_empty() {
                return Err(ApiError::Placement("\"spread\" names no host".into()));
            }
            let mut counts = BTreeMap::new();
            for h in spread {
                check_name(h).map_err(ApiError::BadRequest)?;
                if !known(h) {
                    return Err(unknown(h));
                }
                if counts.insert(h.clone(), 0u64).is_some() {
                    return Err(ApiError::Placement(format!("host '{h}' named twice")));
                }
            }
            Ok(Some(spread_counts(req.clones, spread)))
        }
    }
}

impl CloneHosts for Peers {
    fn local_name(&self) -> &str {
        &self.name
    }

    fn envelope_key(&self) -> [u8; 32] {
        self.key
    }

    fn send_family(&self, host: &str, envelope: &[u8]) -> Result<Duration, RemoteError> {
        let body = serde_json::to_vec(&PostFamily {
            envelope: to_hex(envelope),
        })
        .map_err(|e| RemoteError::Transport {
            host: host.to_owned(),
            why: e.to_string(),
        })?;
        let (status, resp) = self.call(host, "POST", "/v1/families", Some(&body), IO_TIMEOUT)?;
        if status != 201 {
            return Err(Self::refused(host, status, &resp));
        }
        // How long the host took: the rest of the round trip is transit.
        let handled = serde_json::from_slice::<FamilyStatus>(&resp)
            .ok()
            .and_then(|st| st.handled_us)
            .map(Duration::from_micros)
            .unwrap_or_default();
        Ok(handled)
    }

    fn family_status(&self, host: &str, family: u64) -> Result<RemoteFamily, RemoteError> {
        let path = format!("/v1/families/{family}");
        let (status, resp) = self.call(host, "GET", &path, None, POLL_TIMEOUT)?;
        if status != 200 {
            return Err(Self::refused(host, status, &resp));
        }
        let st: FamilyStatus =
            serde_json::from_slice(&resp).map_err(|e| RemoteError::Transport {
                host: host.to_owned(),
                why: format!("GET {path}: {e}"),
            })?;
        let clones = st
            .clones
            .into_iter()
            .map(|c| RemoteClone {
                clone_id: c.clone_id,
                state: match (c.state.as_str(), c.exit) {
                    ("running", _) => RemoteCloneState::Running,
                    ("migrated", _) if c.moved_to.is_some() => RemoteCloneState::Moved {
                        host: c.moved_to.unwrap_or_default(),
                    },
                    ("exited", Some(e)) => RemoteCloneState::Exited {
                        code: e.code,
                        reason: e.reason,
                    },
                    _ => RemoteCloneState::Failed(c.error.unwrap_or_else(|| "failed".into())),
                },
                last_line: c.last_line,
                start_after: c.start_us.map(Duration::from_micros),
                done_after: c.done_us.map(Duration::from_micros),
                faults: c.faults,
            })
            .collect();
        Ok(RemoteFamily {
            clones,
            receiver: st.receiver,
        })
    }

    fn kill_family(&self, host: &str, family: u64) -> Result<(), RemoteError> {
        let path = format!("/v1/families/{family}");
        let (status, resp) = self.call(host, "DELETE", &path, None, IO_TIMEOUT)?;
        match status {
            204 | 404 => Ok(()),
            _ => Err(Self::refused(host, status, &resp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client::parse_response;

    fn req(json: &str) -> ForkVm {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn placements() {
        let known = |h: &str| ["h1", "h2", "h3"].contains(&h);
        let c = placement_counts(&req(r#"{"clones":4,"hosts":{"h1":2,"h2":2}}"#), known)
            .unwrap()
            .unwrap();
        assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![2, 2]);
        let c = placement_counts(&req(r#"{"clones":5,"spread":["h2","h1"]}"#), known)
            .unwrap()
            .unwrap();
        assert_eq!((c["h2"], c["h1"]), (3, 2));
        assert!(placement_counts(&req(r#"{"clones":5}"#), known)
            .unwrap()
            .is_none());
        for (bad, status) in [
            (r#"{"clones":4,"hosts":{"h1":2,"h9":2}}"#, 422),
            (r#"{"clones":4,"hosts":{"h1":2,"h2":1}}"#, 422),
            (r#"{"clones":4,"spread":[]}"#, 422),
            (r#"{"clones":4,"spread":["h1","h1"]}"#, 422),
            (r#"{"clones":4,"spread":["h1"],"hosts":{"h1":4}}"#, 400),
            (r#"{"clones":4,"spread":["h 1"]}"#, 400),
        ] {
            let e = placement_counts(&req(bad), known).unwrap_err();
            assert_eq!(e.status().as_u16(), status, "{bad}: {e}");
        }
    }

    #[test]
    fn peers_and_responses_parse() {
        assert_eq!(
            parse_peer("h2=10.77.1.2:7070").unwrap(),
            ("h2".into(), "10.77.1.2:7070".parse().unwrap())
        );
        assert!(parse_peer("h2").is_err());
        assert!(parse_peer("=1.2.3.4:5").is_err());
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r), Some((200, b"{}".to_vec())));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Some((200, b"{}".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
    }
}
