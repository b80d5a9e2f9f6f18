//! A clone's identity: what must differ between clones of one parent and
//! between families, the complaint users of other VMMs' clones make most
//! (clones waking up with the parent's MAC and IP, or with none, and with
//! the parent's RNG state).
//!
//! - A MAC and an IPv4 address leased from an [`IdentityPool`]: unique
//!   among the live clones of every family the pool serves (one pool per
//!   daemon), returned when the clone ends. Locally administered MACs
//!   `02:fd:00:00:HH:LL` and addresses in 10.200.0.0/16, the same lease
//!   index in both.
//! - A 128-bit generation id per clone (random, like a VM generation id:
//!   a guest that sees it change knows it was cloned), and 32 bytes of
//!   fresh entropy, both written into the clone's agent page
//!   (`guest_agent::abi::AGENT_WORD_*`) before it first runs.

use bitvec::prelude::{BitVec, Lsb0};
use guest_agent::abi;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock};

/// Leases in a pool: 10.200.0.1 ..= 10.200.255.254.
const POOL_SIZE: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no clone identity left: {live} clones hold every address of this daemon's share of 10.200.0.0/16")]
    Exhausted { live: usize },
    #[error("cannot draw random bytes for a clone's generation id and entropy")]
    Random(#[source] memserver::auth::RandomError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneIdentity {
    pub clone_id: u64,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// Random, never zero: a new one for every clone.
    pub generation: u128,
}

impl CloneIdentity {
    /// The MAC in the low 48 bits, as `sf_clone` returns it.
    pub fn mac_u64(&self) -> u64 {
        self.mac.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64)
    }

    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn generation_hex(&self) -> String {
        format!("{:032x}", self.generation)
    }

    /// Writes the identity and `entropy` into a copy of the clone's agent
    /// page (little-endian words, as the guest reads them).
    pub fn write_agent_words(&self, page: &mut [u8], entropy: &[u8; 32]) {
        let mut put = |word: usize, v: u64| {
            if let Some(w) = page.get_mut(word * 8..word * 8 + 8) {
                w.copy_from_slice(&v.to_le_bytes());
            }
        };
        put(abi::AGENT_WORD_GENERATION, self.generation as u64);
        put(
            abi::AGENT_WORD_GENERATION + 1,
            (self.generation >> 64) as u64,
        );
        for (i, chunk) in entropy.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            put(abi::AGENT_WORD_ENTROPY + i, u64::from_le_bytes(w));
        }
        put(abi::AGENT_WORD_MAC, self.mac_u64());
        put(abi::AGENT_WORD_IP, u32::from(self.ip) as u64);
    }
}

/// Fresh entropy for one clone.
pub fn fresh_entropy() -> Result<[u8; 32], IdentityError> {
    let mut e = [0u8; 32];
    memserver::auth::fill_random(&mut e).map_err(IdentityError::Random)?;
    Ok(e)
}

/// Hands out clone MAC/IP pairs, each to one live clone at a time.
pub struct IdentityPool {
    used: Mutex<PoolState>,
}

impl std::fmt::Debug for IdentityPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityPool")
            .field("live", &self.live())
            .finish()
    }
}

struct PoolState {
    bits: BitVec<u64, Lsb0>,
    /// Where the next search starts (recently freed leases are reused last).
    next: usize,
    live: usize,
}

/// A clone's identity, held while the clone lives; returned on drop.
pub struct IdentityLease {
    pool: Arc<IdentityPool>,
    index: usize,
    pub identity: CloneIdentity,
}

impl std::fmt::Debug for IdentityLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityLease")
            .field("identity", &self.identity)
            .finish()
    }
}

impl IdentityLease {
    /// A lease made elsewhere: a clone on this host whose identity the
    /// parent's host leased (`fork::remote`). Dropping it frees nothing.
    pub fn foreign(identity: CloneIdentity) -> IdentityLease {
        static FOREIGN: OnceLock<Arc<IdentityPool>> = OnceLock::new();
        IdentityLease {
            pool: FOREIGN.get_or_init(IdentityPool::new).clone(),
            // Outside every pool's range: `release` ignores it.
            index: usize::MAX,
            identity,
        }
    }
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

impl IdentityPool {
    pub fn new() -> Arc<IdentityPool> {
        let mut bits = BitVec::repeat(false, POOL_SIZE);
        // .0.0 and .255.255 are not host addresses.
        bits.set(0, true);
        bits.set(POOL_SIZE - 1, true);
        Arc::new(IdentityPool {
            used: Mutex::new(PoolState {
                bits,
                next: 1,
                live: 0,
            }),
        })
    }

    /// Share `part` of `parts` of the addresses (`part` < `parts`): the
    /// daemons of a cluster each lease from their own share, so clones of
    /// parents on different hosts never share an address either.
    pub fn share(part: usize, parts: usize) -> Arc<IdentityPool> {
        let parts = parts.clamp(1, POOL_SIZE / 4);
        let part = part.min(parts - 1);
        let (lo, hi) = (POOL_SIZE * part / parts, POOL_SIZE * (part + 1) / parts);
        let pool = IdentityPool::new();
        {
            let mut st = crate::sync::lock(&pool.used);
            for i in (0..lo).chain(hi..POOL_SIZE) {
                st.bits.set(i, true);
            }
            st.next = lo.max(1);
        }
        pool
    }

    /// The process-wide pool: every fork hub of a daemon shares it, so
    /// clones of different families never share an address.
    pub fn global() -> Arc<IdentityPool> {
        static POOL: OnceLock<Arc<IdentityPool>> = OnceLock::new();
        POOL.get_or_init(IdentityPool::new).clone()
    }

    /// Leases an identity for clone `clone_id`.
    pub fn lease(self: &Arc<Self>, clone_id: u64) -> Result<IdentityLease, IdentityError> {
        let mut generation = [0u8; 16];
        memserver::auth::fill_random(&mut generation).map_err(IdentityError::Random)?;
        // Never zero: zero means "no generation id" to the guest.
        let generation = u128::from_le_bytes(generation) | 1;
        let mut st = crate::sync::lock(&self.used);
        let start = st.next;
        let found = st.bits[start..]
            .first_zero()
            .map(|i| i + start)
            .or_else(|| st.bits[..start].first_zero());
        let Some(index) = found else {
            return Err(IdentityError::Exhausted { live: st.live });
        };
        st.bits.set(index, true);
        st.next = (index + 1) % POOL_SIZE;
        st.live += 1;
        drop(st);
        let n = index as u16;
        let (hi, lo) = ((n >> 8) as u8, n as u8);
        Ok(IdentityLease {
            pool: self.clone(),
            index,
            identity: CloneIdentity {
                clone_id,
                // 0x02: locally administered, unicast.
                mac: [0x02, 0xfd, 0x00, 0x00, hi, lo],
                ip: Ipv4Addr::new(10, 200, hi, lo),
                generation,
            },
        })
    }

    /// Clones holding an identity now.
    pub fn live(&self) -> usize {
        crate::sync::lock(&self.used).live
    }

    fn release(&self, index: usize) {
        let mut st = crate::sync::lock(&self.used);
        if st.bits.get(index).is_some_and(|b| *b) {
            st.bits.set(index, false);
            st.live -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_do_not_overlap() {
        let (a, b) = (IdentityPool::share(0, 2), IdentityPool::share(1, 2));
        let la: Vec<_> = (0..3).map(|i| a.lease(i).unwrap()).collect();
        let lb: Vec<_> = (0..3).map(|i| b.lease(i).unwrap()).collect();
        for l in &la {
            assert!(l.identity.ip.octets()[2] < 128, "{:?}", l.identity);
            assert!(lb.iter().all(|m| m.identity.ip != l.identity.ip));
        }
        assert_eq!(lb[0].identity.ip, Ipv4Addr::new(10, 200, 128, 0));
        let tiny = IdentityPool::share(3, 4);
        let n = (0..20_000).take_while(|i| tiny.lease(*i).map(std::mem::forget).is_ok());
        // The last quarter less .255.255.
        assert_eq!(n.count(), POOL_SIZE / 4 - 1);
    }
    use std::collections::HashSet;

    #[test]
    fn leases_are_unique_while_live_and_returned_on_drop() {
        let pool = IdentityPool::new();
        let a: Vec<_> = (1..=300).map(|i| pool.lease(i).unwrap()).collect();
        let macs: HashSet<_> = a.iter().map(|l| l.identity.mac).collect();
        let ips: HashSet<_> = a.iter().map(|l| l.identity.ip).collect();
        let gens: HashSet<_> = a.iter().map(|l| l.identity.generation).collect();
        assert_eq!((macs.len(), ips.len(), gens.len()), (300, 300, 300));
        assert!(a.iter().all(|l| l.identity.generation != 0));
        assert_eq!(a[0].identity.ip, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a[0].identity.mac_string(), "02:fd:00:00:00:01");
        assert_eq!(a[257].identity.ip, Ipv4Addr::new(10, 200, 1, 2));
        assert_eq!(pool.live(), 300);
        drop(a);
        assert_eq!(pool.live(), 0);
    }

    #[test]
    fn an_exhausted_pool_refuses_clearly_and_recovers() {
        let pool = IdentityPool::new();
        let all: Vec<_> = (0..POOL_SIZE - 2)
            .map(|i| pool.lease(i as u64).unwrap())
            .collect();
        let err = pool.lease(0).expect_err("exhausted");
        assert!(err.to_string().contains("no clone identity left"), "{err}");
        drop(all);
        assert!(pool.lease(1).is_ok());
    }

    #[test]
    fn agent_words_carry_the_identity() {
        let pool = IdentityPool::new();
        let l = pool.lease(3).unwrap();
        let mut page = vec![0u8; 4096];
        l.identity.write_agent_words(&mut page, &[7u8; 32]);
        let word = |w: usize| u64::from_le_bytes(page[w * 8..w * 8 + 8].try_into().unwrap());
        let gen = word(abi::AGENT_WORD_GENERATION) as u128
            | (word(abi::AGENT_WORD_GENERATION + 1) as u128) << 64;
        assert_eq!(gen, l.identity.generation);
        assert_eq!(word(abi::AGENT_WORD_ENTROPY), u64::from_le_bytes([7; 8]));
        assert_eq!(word(abi::AGENT_WORD_MAC), l.identity.mac_u64());
        assert_eq!(word(abi::AGENT_WORD_IP), u32::from(l.identity.ip) as u64);
    }
}
