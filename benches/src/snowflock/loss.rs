//! Packet loss on the clone hosts (this kernel has no netem): an nftables
//! table in each host's network namespace whose input chain drops P % of
//! the UDP datagrams arriving there (`numgen random mod 100 < P`), as the
//! test `clones_repair_ten_percent_loss_on_their_hosts` does. TCP (the
//! daemons' API) is untouched. The [`Loss`] guard removes the tables on
//! drop; `cluster down` would remove them with the namespaces anyway.

use crate::cluster::{describe, run_cmd};
use anyhow::{bail, Result};
use std::process::Command;
use std::time::Duration;

const TABLE: &str = "sfbench_loss";
const NFT: Duration = Duration::from_secs(10);

fn nft(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", netns, "nft"];
    all.extend_from_slice(args);
    let o = run_cmd(Command::new("ip").args(&all), NFT)?;
    if !o.status.success() {
        bail!(
            "nft {} in {netns} failed (is nftables installed?): {}",
            args.join(" "),
            describe(&o)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Loss rules in some namespaces; removed on drop.
pub struct Loss {
    netns: Vec<String>,
}

impl Loss {
    /// Drops `pct` % of the UDP datagrams arriving in each of `netns`.
    pub fn add(netns: &[String], pct: f64) -> Result<Loss> {
        let mut loss = Loss { netns: Vec::new() };
        if pct <= 0.0 {
            return Ok(loss);
        }
        let p = (pct.round() as u64).min(100).to_string();
        for ns in netns {
            nft(ns, &["add", "table", "inet", TABLE])?;
            loss.netns.push(ns.clone());
            nft(
                ns,
                &[
                    "add",
                    "chain",
                    "inet",
                    TABLE,
                    "input",
                    "{ type filter hook input priority 0; }",
                ],
            )?;
            nft(
                ns,
                &[
                    "add", "rule", "inet", TABLE, "input", "meta", "l4proto", "udp", "numgen",
                    "random", "mod", "100", "<", &p, "counter", "drop",
                ],
            )?;
        }
        Ok(loss)
    }

    /// Datagrams dropped so far, over all the namespaces.
    pub fn dropped(&self) -> Result<Option<u64>> {
        if self.netns.is_empty() {
            return Ok(None);
        }
        let mut total = 0;
        for ns in &self.netns {
            total += packets(&nft(ns, &["list", "table", "inet", TABLE])?).unwrap_or(0);
        }
        Ok(Some(total))
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        for ns in &self.netns {
            if let Err(e) = nft(ns, &["delete", "table", "inet", TABLE]) {
                eprintln!("snowflock: removing the loss rules: {e:#}");
            }
        }
    }
}

/// The `packets N` of an nft counter listing.
fn packets(listing: &str) -> Option<u64> {
    listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        let l = "table inet sfbench_loss {\n chain input {\n  meta l4proto udp numgen random mod 100 < 10 counter packets 123 bytes 4567 drop\n }\n}";
        assert_eq!(packets(l), Some(123));
        assert_eq!(packets("table inet x {}"), None);
    }
}
