//! The zone workload: a deterministic simulation of one game-world zone.
//!
//! The zone state is an array of entities (4 words each: position, velocity,
//! hit points and score, id and flags) on a 65536×65536 wrap-around grid.
//! Every tick: clients send [`UPDATES_PER_TICK`] updates (velocity and hit
//! point changes for random entities), which arrive in an inbox buffer of
//! [`INBOX_WORDS`] words that is fully overwritten every tick (after a fork
//! the zone declares it to the VMM, which then need not fetch it: avoidance
//! heuristic b); the entities of `dirty_pages` random
//! state pages move (and with `dirty_all`, one entity of every page); an
//! interest-management scan reads the whole state; and
//! `alloc_mib` of fresh buffers are allocated, fully overwritten, read back
//! and freed. The checksum depends only on the configuration and the clone
//! id, never on time or on where the guest ran.
//!
//! With `clients=host` the zone generates no updates itself: at the start
//! of every tick (and once more after the last) it applies the updates the
//! daemon put into its inbox ring, in ring order, into the per-client
//! table of [`crate::clients`], each costing `update_cost` passes over its
//! payload. The checksum is then `mix64(tick part ^ clients digest)`: the
//! tick part is the run above without generated updates (cmdline and clone
//! id only), the digest depends only on each client's ordered sequence of
//! applied updates — never on the tick an update arrived in.

use crate::clients::{Applied, ClientTable, Update};
use crate::cmdline::ZoneConfig;
use crate::mix::{mix64, Fold, Rng};
use core::fmt;

/// Client updates applied per tick.
pub const UPDATES_PER_TICK: u64 = 256;
/// The client inbox: 64 KiB, refilled every tick.
pub const INBOX_WORDS: usize = 8192;
/// Words per entity.
const ENTITY_WORDS: usize = 4;
/// Words per 4 KiB page.
const PAGE_WORDS: usize = 512;
const GRID_MASK: u64 = 0xffff;

/// Domain separators for the pseudo-random streams.
const INIT_STREAM: u64 = 0x1a17_0000_0000_0001;
const TICK_STREAM: u64 = 0x71c4_0000_0000_0002;
const SCRATCH_STREAM: u64 = 0x5c7a_0000_0000_0003;
const CLONE_STREAM: u64 = 0xc10e_0000_0000_0004;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneError {
    /// The state is too small to hold one page of entities.
    StateTooSmall,
    /// The allocator could not hand out a scratch buffer of this many MiB.
    OutOfMemory { mib: u64 },
    /// `fork_at` without `as_clone` needs the VMM's fork service.
    ForkUnavailable,
    /// The VMM refused to fork (hypercall status).
    ForkRefused(u32),
}

impl fmt::Display for ZoneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZoneError::StateTooSmall => write!(f, "zone state smaller than one page"),
            ZoneError::OutOfMemory { mib } => {
                write!(f, "out of guest memory allocating a {mib} MiB buffer")
            }
            ZoneError::ForkUnavailable => write!(
                f,
                "fork_at needs sf_clone from the VMM, which is not available here; \
                 use as_clone=I for the straight-line run of clone I"
            ),
            ZoneError::ForkRefused(status) => {
                write!(f, "the VMM refused to fork (status {status})")
            }
        }
    }
}

/// What the workload needs from the machine it runs on.
pub trait Platform {
    /// Allocates `words` fresh words, runs `f` on them, frees them.
    fn with_scratch(
        &mut self,
        words: usize,
        f: &mut dyn FnMut(&mut [u64]),
    ) -> Result<(), ZoneError>;
    /// Forks the zone into `clones` clones; returns this VM's clone id
    /// (0 in the parent).
    fn fork(&mut self, clones: u64) -> Result<u64, ZoneError>;
    /// Waits until tick `tick` is due when ticks last `tick_us` each.
    fn pace(&mut self, tick: u64, tick_us: u64);
    /// Tells the VMM `buf` will be fully overwritten before it is read.
    fn will_overwrite(&mut self, _buf: &[u64]) {}
    /// If the host forked this VM since the last call: this VM's clone id.
    fn host_fork(&mut self) -> Option<u64> {
        None
    }
    /// Reports that the zone forked (by the host) before tick `tick`.
    fn note_host_fork(&mut self, _tick: u64, _clone_id: u64) {}
    /// The zone is about to look for a host fork for the last time.
    fn finishing(&mut self) {}
    /// `clients=host`: hands every update waiting in the inbox (at the
    /// start of tick `tick`) to `apply`, in order, and records what became
    /// of each. True if it stopped early and wants to be called again (the
    /// host-side oracle, at a family-size change). No ring (QEMU): nothing.
    fn drain_inbox(&mut self, _tick: u64, _apply: &mut dyn FnMut(&Update) -> Applied) -> bool {
        false
    }
    /// The family size the VMM wrote into the agent page now (`None`:
    /// nothing written). Read when the zone notices a host fork (with the
    /// clone id: both change at the same tick boundary) and before every
    /// drain, where a 1 is the daemon's reset at a join.
    fn family_size(&mut self) -> Option<u64> {
        None
    }
    /// A guest fork (`sf_clone`, `as_clone`) made a family of `members`.
    fn set_family_members(&mut self, _members: u64) {}
    /// Tick `tick` finished its work (before pacing): the guest publishes
    /// its tick load.
    fn tick_done(&mut self, _tick: u64) {}
}

/// The result the guest prints on its last console line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub clone_id: u64,
    pub ticks: u64,
    pub checksum: u64,
}

fn init_state(state: &mut [u64], seed: u64) {
    let mut rng = Rng::new(mix64(seed ^ INIT_STREAM));
    for (i, e) in state.chunks_exact_mut(ENTITY_WORDS).enumerate() {
        let r = rng.next();
        e[0] = r & 0x0000_ffff_0000_ffff;
        e[1] = velocity(r >> 16);
        e[2] = (r >> 40) & 0xffff_ffff;
        e[3] = i as u64;
    }
}

/// Packs a velocity in -3..=3 per axis from random bits.
fn velocity(r: u64) -> u64 {
    let vx = ((r & 0xff) % 7) as i32 - 3;
    let vy = (((r >> 8) & 0xff) % 7) as i32 - 3;
    (vx as u32 as u64) | ((vy as u32 as u64) << 32)
}

fn move_entity(e: &mut [u64]) {
    let (x, y) = (e[0] & GRID_MASK, (e[0] >> 32) & GRID_MASK);
    let (vx, vy) = (e[1] as u32 as i32 as i64, (e[1] >> 32) as u32 as i32 as i64);
    let x = (x as i64 + vx) as u64 & GRID_MASK;
    let y = (y as i64 + vy) as u64 & GRID_MASK;
    e[0] = x | (y << 32);
    e[2] = e[2].wrapping_add(1 << 32);
}

struct Zone<'s> {
    cfg: ZoneConfig,
    state: &'s mut [u64],
    inbox: &'s mut [u64],
    salt: u64,
    /// Declare the inbox before its next refill (after a fork).
    declare_inbox: bool,
    /// `clients=host`: the per-client table.
    clients: Option<ClientTable<'s>>,
    clone_id: u64,
    /// Members of the fork family (1: not forked).
    members: u64,
}

impl Zone<'_> {
    fn entities(&self) -> u64 {
        (self.state.len() / ENTITY_WORDS) as u64
    }

    /// Mixes a clone id into the state and every later random stream.
    fn become_clone(&mut self, clone_id: u64) {
        if clone_id == 0 {
            return;
        }
        self.salt = mix64(clone_id ^ CLONE_STREAM);
        let i = (clone_id % self.entities()) as usize * ENTITY_WORDS;
        self.state[i + 2] ^= self.salt;
    }

    /// Applies the host's client updates waiting in the inbox ring.
    fn drain(&mut self, t: u64, platform: &mut dyn Platform) {
        if self.clients.is_none() {
            return;
        }
        loop {
            // A join: the daemon set the family size back to 1.
            if self.members > 1 && platform.family_size() == Some(1) {
                self.members = 1;
            }
            let (cost, clone_id, members) = (self.cfg.update_cost, self.clone_id, self.members);
            let Some(table) = self.clients.as_mut() else {
                return;
            };
            let again =
                platform.drain_inbox(t, &mut |u: &Update| table.apply(u, cost, clone_id, members));
            if !again {
                return;
            }
        }
    }

    fn tick(&mut self, t: u64, platform: &mut dyn Platform) -> Result<u64, ZoneError> {
        let base = self.cfg.seed ^ mix64(t ^ TICK_STREAM) ^ self.salt;
        let mut rng = Rng::new(mix64(base));
        let n = self.entities();
        let generated = self.clients.is_none();
        if generated {
            if self.declare_inbox {
                platform.will_overwrite(self.inbox);
                self.declare_inbox = false;
            }
            for w in self.inbox.iter_mut() {
                *w = rng.next();
            }
            for k in 0..UPDATES_PER_TICK as usize {
                let (target, r) = (self.inbox[2 * k], self.inbox[2 * k + 1]);
                let i = ((target as u128 * n as u128) >> 64) as usize * ENTITY_WORDS;
                self.state[i + 1] = velocity(r);
                self.state[i + 2] ^= r >> 48;
            }
        }
        let pages = (self.state.len() / PAGE_WORDS) as u64;
        for _ in 0..self.cfg.dirty_pages {
            let p = rng.below(pages) as usize * PAGE_WORDS;
            for e in self.state[p..p + PAGE_WORDS].chunks_exact_mut(ENTITY_WORDS) {
                move_entity(e);
            }
        }
        if self.cfg.dirty_all {
            // One entity per page moves: every page is written.
            for page in self.state.chunks_exact_mut(PAGE_WORDS) {
                move_entity(&mut page[..ENTITY_WORDS]);
            }
        }
        let mut fold = Fold::default();
        fold.add_words(self.state);
        if generated {
            fold.add_words(self.inbox);
        }
        if self.cfg.alloc_mib > 0 {
            let words = (self.cfg.alloc_mib << 20) as usize / 8;
            let mut srng = Rng::new(mix64(base ^ SCRATCH_STREAM));
            platform
                .with_scratch(words, &mut |buf: &mut [u64]| {
                    for w in buf.iter_mut() {
                        *w = srng.next();
                    }
                    fold.add_words(buf);
                })
                .map_err(|_| ZoneError::OutOfMemory {
                    mib: self.cfg.alloc_mib,
                })?;
        }
        Ok(fold.finish())
    }
}

/// Runs the zone described by `cfg` on `state` (its `state_mib` MiB),
/// `inbox` ([`INBOX_WORDS`] words) and, with `clients=host`, `table` (the
/// client table, [`crate::clients::TABLE_WORDS`] words; unused otherwise);
/// contents irrelevant, all are initialised here.
pub fn run(
    cfg: &ZoneConfig,
    state: &mut [u64],
    inbox: &mut [u64],
    table: &mut [u64],
    platform: &mut dyn Platform,
) -> Result<Outcome, ZoneError> {
    if state.len() < PAGE_WORDS || inbox.len() < 2 * UPDATES_PER_TICK as usize {
        return Err(ZoneError::StateTooSmall);
    }
    init_state(state, cfg.seed);
    let mut zone = Zone {
        cfg: cfg.clone(),
        state,
        inbox,
        salt: 0,
        declare_inbox: false,
        clients: cfg.host_clients.then(|| ClientTable::new(table)),
        clone_id: 0,
        members: 1,
    };
    let mut clone_id = 0;
    let mut acc = mix64(cfg.seed);
    for t in 0..=cfg.ticks {
        // A fork the host started lands at a tick boundary, in the parent
        // and in every clone alike: as if `fork_at=t` had been asked for.
        if t == cfg.ticks {
            platform.finishing();
        }
        if let Some(id) = platform.host_fork() {
            clone_id = id;
            zone.become_clone(id);
            zone.clone_id = id;
            zone.members = platform.family_size().unwrap_or(1).max(1);
            zone.declare_inbox = true;
            platform.note_host_fork(t, id);
        }
        if cfg.fork_at == Some(t) {
            clone_id = match cfg.as_clone {
                Some(i) => i,
                None => platform.fork(cfg.clones.unwrap_or(1))?,
            };
            zone.become_clone(clone_id);
            zone.clone_id = clone_id;
            zone.members = match cfg.as_clone {
                Some(_) => cfg.clones.unwrap_or(1) + 1,
                // sf_clone: the clones granted (it wrote them).
                None => platform
                    .family_size()
                    .unwrap_or(cfg.clones.unwrap_or(1) + 1),
            };
            platform.set_family_members(zone.members);
            zone.declare_inbox = true;
        }
        zone.drain(t, platform);
        if t == cfg.ticks {
            break;
        }
        let h = zone.tick(t, platform)?;
        acc = mix64(acc.wrapping_add(h) ^ t);
        platform.tick_done(t);
        if cfg.tick_us > 0 {
            platform.pace(t + 1, cfg.tick_us);
        }
    }
    let mut fold = Fold::default();
    fold.add_words(zone.state);
    let mut checksum = mix64(acc ^ fold.finish());
    if let Some(table) = &zone.clients {
        checksum = mix64(checksum ^ table.digest());
    }
    Ok(Outcome {
        clone_id,
        ticks: cfg.ticks,
        checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::parse;

    /// A host stand-in for the guest: scratch buffers from a Vec.
    struct HostPlatform;

    impl Platform for HostPlatform {
        fn with_scratch(
            &mut self,
            words: usize,
            f: &mut dyn FnMut(&mut [u64]),
        ) -> Result<(), ZoneError> {
            let mut v = vec![0xdead_beef_u64; words];
            f(&mut v);
            Ok(())
        }
        fn fork(&mut self, _clones: u64) -> Result<u64, ZoneError> {
            Err(ZoneError::ForkUnavailable)
        }
        fn pace(&mut self, _tick: u64, _tick_us: u64) {}
    }

    fn run_cmdline(c: &str) -> Result<Outcome, ZoneError> {
        let cfg = parse(c).unwrap();
        let mut state = vec![0u64; (cfg.state_mib << 20) as usize / 8];
        let mut inbox = vec![0u64; INBOX_WORDS];
        run(&cfg, &mut state, &mut inbox, &mut [], &mut HostPlatform)
    }

    #[test]
    fn deterministic_and_sensitive() {
        let a = run_cmdline("ticks=20 state_mib=1 seed=3 dirty_pages=4 alloc_mib=1").unwrap();
        let b = run_cmdline("ticks=20 state_mib=1 seed=3 dirty_pages=4 alloc_mib=1").unwrap();
        assert_eq!(a, b);
        let c = run_cmdline("ticks=20 state_mib=1 seed=4 dirty_pages=4 alloc_mib=1").unwrap();
        assert_ne!(a.checksum, c.checksum);
        let all = run_cmdline("ticks=20 state_mib=1 seed=3 dirty_pages=4 alloc_mib=1 dirty_all=1");
        assert_ne!(
            all.unwrap().checksum,
            a.checksum,
            "dirty_all moves entities"
        );
        // tick_us changes timing only.
        let d =
            run_cmdline("ticks=20 state_mib=1 seed=3 dirty_pages=4 alloc_mib=1 tick_us=9").unwrap();
        assert_eq!(a, d);
    }

    #[test]
    fn clones_diverge_and_clone_zero_is_the_parent() {
        let plain = run_cmdline("ticks=10 state_mib=1").unwrap();
        let c0 = run_cmdline("ticks=10 state_mib=1 fork_at=4 clones=2 as_clone=0").unwrap();
        let c1 = run_cmdline("ticks=10 state_mib=1 fork_at=4 clones=2 as_clone=1").unwrap();
        let c2 = run_cmdline("ticks=10 state_mib=1 fork_at=4 clones=2 as_clone=2").unwrap();
        assert_eq!(plain.checksum, c0.checksum);
        assert_ne!(c1.checksum, c0.checksum);
        assert_ne!(c1.checksum, c2.checksum);
        assert_eq!(c2.clone_id, 2);
        assert_eq!(
            run_cmdline("ticks=10 state_mib=1 fork_at=4 clones=2"),
            Err(ZoneError::ForkUnavailable)
        );
    }
}
