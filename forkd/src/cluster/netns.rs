//! Network namespaces and links through iproute2's `ip`. Every failure
//! names the command and carries its stderr.

use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Where `ip netns add` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum IpError {
    #[error("cannot run `{cmd}` (is iproute2 installed? scripts/setup.sh installs it): {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

fn render(args: &[&str]) -> String {
    let mut s = String::from("ip");
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `ip ARGS...`; its stdout on success.
pub fn ip(args: &[&str]) -> Result<String, IpError> {
    let cmd = render(args);
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| IpError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(IpError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: if stderr.is_empty() {
                "(no error output)".into()
            } else {
                stderr
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n NS ARGS...` (inside namespace NS).
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, IpError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// The named namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>, IpError> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

pub fn exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// The namespace's inode (what `/proc/PID/ns/net` of a process inside
/// it resolves to).
pub fn inode(ns: &str) -> Option<u64> {
    std::fs::metadata(Path::new(NETNS_DIR).join(ns))
        .ok()
        .map(|m| m.ino())
}

pub fn add(ns: &str) -> Result<(), IpError> {
    ip(&["netns", "add", ns]).map(drop)
}

pub fn delete(ns: &str) -> Result<(), IpError> {
    ip(&["netns", "delete", ns]).map(drop)
}

/// The processes inside namespace `ns` (`ip netns pids`).
pub fn pids(ns: &str) -> Result<Vec<u32>, IpError> {
    Ok(ip(&["netns", "pids", ns])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Whether `a/len` and `b/24` overlap.
fn overlaps(a: Ipv4Addr, len: u8, b: Ipv4Addr) -> bool {
    let common = u32::from(len.min(24));
    if common == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - common);
    u32::from(a) & mask == u32::from(b) & mask
}

/// `A.B.C.D` or `A.B.C.D/LEN`.
fn parse_prefix(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok().filter(|l: &u8| *l <= 32)?),
        None => (s, 32),
    };
    Some((addr.parse().ok()?, len))
}

/// Something of the root namespace (an address or a route, not the
/// default route) that overlaps `net/24`, as `ip` prints it.
pub fn root_use_of(net: Ipv4Addr) -> Result<Option<String>, IpError> {
    for line in ip(&["-4", "-o", "addr", "show"])?.lines() {
        let mut words = line.split_whitespace();
        if let Some(p) = words.by_ref().find(|w| *w == "inet").and(words.next()) {
            if let Some((a, len)) = parse_prefix(p) {
                if overlaps(a, len, net) {
                    return Ok(Some(format!("address: {}", line.trim())));
                }
            }
        }
    }
    for line in ip(&["-4", "route", "show", "table", "all"])?.lines() {
        // `DEST ...` or `TYPE DEST ...` (local, broadcast, unreachable, ...).
        let found = line
            .split_whitespace()
            .take(2)
            .filter_map(parse_prefix)
            .find(|(a, len)| *len > 0 && overlaps(*a, *len, net));
        if found.is_some() {
            return Ok(Some(format!("route: {}", line.trim())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let net = Ipv4Addr::new(10, 77, 5, 0);
        assert!(overlaps(Ipv4Addr::new(10, 77, 5, 9), 32, net));
        assert!(overlaps(Ipv4Addr::new(10, 0, 0, 0), 8, net));
        assert!(!overlaps(Ipv4Addr::new(10, 77, 6, 0), 24, net));
        assert!(!overlaps(Ipv4Addr::new(192, 0, 2, 0), 24, net));
        assert_eq!(
            parse_prefix("10.1.2.3/16"),
            Some((Ipv4Addr::new(10, 1, 2, 3), 16))
        );
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("1.2.3.4/33"), None);
        assert_eq!(render(&["netns", "add", "x"]), "ip netns add x");
    }
}
