//! The host-side oracle of `clients=host` zones (host builds only): runs
//! the zone workload on the host with a given sequence of client updates
//! and returns what the guest must print. The end-to-end tests and the
//! benchmarks compare a VM's `zone: done` checksum with it.

use crate::clients::{Applied, Update, TABLE_WORDS};
use crate::cmdline;
use crate::mix::{mix64, Rng};
use crate::zone::{self, Outcome, Platform, ZoneError, INBOX_WORDS};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// A client update with its payload owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedUpdate {
    pub client: u32,
    pub seq: u64,
    pub payload: Vec<u8>,
}

impl OwnedUpdate {
    /// Update `seq` of `client` with [`payload_for`]'s payload.
    pub fn generated(client: u32, seq: u64, len: usize) -> Self {
        OwnedUpdate {
            client,
            seq,
            payload: payload_for(client, seq, len),
        }
    }
}

/// A deterministic payload of `len` bytes for update `seq` of `client`
/// (what the tests and benchmarks send).
pub fn payload_for(client: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(mix64(((client as u64) << 32) ^ seq ^ 0x9a71_0ad0));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What the host-side zone is handed, in ring order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An update in the ring.
    Update(OwnedUpdate),
    /// The daemon sets the family size in the agent page (a join: 1).
    Members(u64),
}

struct HostPlatform<'u> {
    schedule: &'u [(u64, Event)],
    next: usize,
    members: Option<u64>,
}

impl Platform for HostPlatform<'_> {
    fn with_scratch(
        &mut self,
        words: usize,
        f: &mut dyn FnMut(&mut [u64]),
    ) -> Result<(), ZoneError> {
        let mut v = vec![0u64; words];
        f(&mut v);
        Ok(())
    }
    fn fork(&mut self, _clones: u64) -> Result<u64, ZoneError> {
        Err(ZoneError::ForkUnavailable)
    }
    fn pace(&mut self, _tick: u64, _tick_us: u64) {}
    fn drain_inbox(&mut self, tick: u64, apply: &mut dyn FnMut(&Update) -> Applied) -> bool {
        while let Some((t, e)) = self.schedule.get(self.next) {
            if *t > tick {
                break;
            }
            self.next += 1;
            match e {
                Event::Update(u) => {
                    apply(&Update {
                        client: u.client,
                        seq: u.seq,
                        payload: &u.payload,
                    });
                }
                // The zone looks at the family size before its next drain.
                Event::Members(m) => {
                    self.members = Some(*m);
                    return true;
                }
            }
        }
        false
    }

    fn family_size(&mut self) -> Option<u64> {
        self.members
    }
}

/// What a zone with `cmdline` (which must say `clients=host`) prints when
/// it is handed `schedule`: (tick, update) pairs in ring order, ticks not
/// decreasing; an update is applied at the start of its tick (past the
/// last tick: after it). A fork member is `fork_at=T clones=C as_clone=I`
/// on the cmdline, the updates before the fork scheduled before `T`. Since
/// the checksum does not depend on when an update arrived, for a VM that
/// never forked every tick gives the same answer.
pub fn reference(cmdline: &str, schedule: &[(u64, OwnedUpdate)]) -> Result<Outcome, String> {
    let events: Vec<_> = schedule
        .iter()
        .map(|(t, u)| (*t, Event::Update(u.clone())))
        .collect();
    reference_events(cmdline, &events)
}

/// [`reference`] with family-size changes among the updates: after
/// `Event::Members(1)` (a join) a parent applies every client again.
pub fn reference_events(cmdline: &str, schedule: &[(u64, Event)]) -> Result<Outcome, String> {
    let cfg = cmdline::parse(cmdline).map_err(|e| e.to_string())?;
    if !cfg.host_clients {
        return Err("the cmdline does not say clients=host".into());
    }
    let mut state = vec![0u64; (cfg.state_mib << 20) as usize / 8];
    let mut inbox = vec![0u64; INBOX_WORDS];
    let mut table = vec![0u64; TABLE_WORDS];
    let mut p = HostPlatform {
        schedule,
        next: 0,
        members: None,
    };
    zone::run(&cfg, &mut state, &mut inbox, &mut table, &mut p).map_err(|e| e.to_string())
}

/// [`reference`] for a VM that never forked: `updates` in ring order.
pub fn reference_sequence(cmdline: &str, updates: &[OwnedUpdate]) -> Result<Outcome, String> {
    let schedule: Vec<_> = updates.iter().map(|u| (0, u.clone())).collect();
    reference(cmdline, &schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD: &str = "ticks=12 state_mib=1 seed=5 clients=host update_cost=3";

    fn ups(clients: u32, per: u64) -> Vec<OwnedUpdate> {
        let mut v = Vec::new();
        for s in 1..=per {
            for c in 0..clients {
                v.push(OwnedUpdate::generated(
                    c,
                    s,
                    256 + (c as usize * 37 + s as usize) % 257,
                ));
            }
        }
        v
    }

    #[test]
    fn arrival_tick_and_duplicates_do_not_matter() {
        let u = ups(5, 4);
        let at0 = reference_sequence(CMD, &u).unwrap();
        let spread: Vec<_> = u
            .iter()
            .enumerate()
            .map(|(i, x)| (i as u64 / 3, x.clone()))
            .collect();
        assert_eq!(reference(CMD, &spread).unwrap(), at0);
        let mut dup = u.clone();
        dup.insert(7, u[2].clone());
        dup.extend(u[..5].iter().cloned());
        assert_eq!(reference_sequence(CMD, &dup).unwrap(), at0);
        // Another interleaving across clients, same per-client order.
        let mut by_client = u.clone();
        by_client.sort_by_key(|x| (x.client, x.seq));
        assert_eq!(reference_sequence(CMD, &by_client).unwrap(), at0);
        // Fewer updates, another checksum; no updates: the empty run.
        assert_ne!(reference_sequence(CMD, &u[..19]).unwrap(), at0);
        let empty = reference_sequence(CMD, &[]).unwrap();
        assert_ne!(empty, at0);
        assert!(reference(
            "ticks=12 state_mib=1 seed=5 clients=host update_cost=4",
            &[]
        )
        .is_ok_and(|o| o == empty));
        assert!(reference("ticks=3", &[]).is_err());
    }

    #[test]
    fn clones_apply_their_share() {
        let u = ups(6, 3);
        let fork = "ticks=12 state_mib=1 seed=5 clients=host update_cost=3 fork_at=4 clones=2";
        let (pre, post) = u.split_at(6);
        let sched: Vec<_> = pre
            .iter()
            .map(|x| (1, x.clone()))
            .chain(post.iter().map(|x| (5, x.clone())))
            .collect();
        for i in 0..=2u64 {
            let got = reference(&format!("{fork} as_clone={i}"), &sched).unwrap();
            // Only clone i's clients after the fork count.
            let mine: Vec<_> = sched
                .iter()
                .filter(|(t, x)| *t < 4 || x.client as u64 % 3 == i)
                .cloned()
                .collect();
            let want = reference(&format!("{fork} as_clone={i}"), &mine).unwrap();
            assert_eq!(got, want);
            assert_eq!(got.clone_id, i);
        }
        // A join: the parent takes every client again.
        let parent = format!("{fork} as_clone=0");
        let more = ups(6, 2);
        let later: Vec<_> = more
            .iter()
            .map(|u| OwnedUpdate::generated(u.client, u.seq + 3, 300))
            .collect();
        let mut ev: Vec<_> = sched
            .iter()
            .map(|(t, u)| (*t, Event::Update(u.clone())))
            .collect();
        let without_join = reference_events(&parent, &ev).unwrap();
        ev.push((6, Event::Members(1)));
        ev.extend(later.iter().map(|u| (6, Event::Update(u.clone()))));
        let joined = reference_events(&parent, &ev).unwrap();
        assert_ne!(joined, without_join);
        // Without the join, the other members' clients stay skipped.
        ev.retain(|(_, e)| *e != Event::Members(1));
        let mine_only: Vec<_> = ev
            .iter()
            .filter(|(t, e)| match e {
                Event::Update(u) => *t < 4 || u.client % 3 == 0,
                Event::Members(_) => true,
            })
            .cloned()
            .collect();
        assert_eq!(
            reference_events(&parent, &ev).unwrap(),
            reference_events(&parent, &mine_only).unwrap()
        );
    }
}
