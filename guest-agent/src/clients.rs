//! Client updates in the zone (`clients=host`): the per-client table that
//! makes at-least-once delivery exactly-once application, the work each
//! update costs (`update_cost`), and the digest of the clients' effects.
//!
//! The checksum rule: the table holds per client its last applied
//! sequence number, how many updates it applied and an accumulator that
//! folds each applied update in order (`acc = mix64(acc ^ h(update))`).
//! The digest sums a mix of every entry, so it depends on each client's
//! ordered sequence of applied updates only — not on how clients'
//! updates interleave, on the tick an update arrived in, or on timing.
//! Updates are applied in ring order; one whose `seq` is not above the
//! client's last applied one is a duplicate and is skipped. Sequence
//! numbers start at 1.
//!
//! A fork member with clone id `i` of `m` members applies only the
//! clients with `client % m == i` (the parent is member 0).

use crate::abi;
use crate::mix::mix64;

/// Distinct clients one zone keeps state for.
pub const TABLE_ENTRIES: usize = 16384;
/// Words of the table (4 per entry: key, last seq, count, accumulator).
pub const TABLE_WORDS: usize = TABLE_ENTRIES * 4;
/// Largest `update_cost`.
pub const MAX_UPDATE_COST: u64 = 100_000;

const UPDATE_STREAM: u64 = 0xc11e_0000_0000_0005;
const DIGEST_STREAM: u64 = 0xd16e_0000_0000_0006;

/// One client update as the zone sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update<'a> {
    pub client: u32,
    pub seq: u64,
    pub payload: &'a [u8],
}

/// What became of one update (the ring slot's status, `abi::SLOT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
    NotMine,
    /// Empty or oversized payload, sequence 0, or the table is full.
    Malformed,
}

impl Applied {
    pub fn slot_status(self) -> u32 {
        match self {
            Applied::Applied => abi::SLOT_APPLIED,
            Applied::Duplicate => abi::SLOT_DUPLICATE,
            Applied::NotMine => abi::SLOT_NOT_MINE,
            Applied::Malformed => abi::SLOT_MALFORMED,
        }
    }
}

/// The work one update costs: `cost` passes over its payload (at least
/// one), each word mixed in. Deterministic in the update alone.
pub fn update_hash(u: &Update, cost: u64) -> u64 {
    let mut h = mix64(((u.client as u64) << 32) ^ u.seq ^ UPDATE_STREAM);
    h = mix64(h ^ u.payload.len() as u64);
    // The payload as words once (at most a slot's), then the passes.
    let mut words = [0u64; (abi::UPDATE_PAYLOAD_MAX / 8) as usize];
    let mut n = 0;
    for (w, chunk) in words.iter_mut().zip(u.payload.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
        n += 1;
    }
    for round in 0..cost.max(1) {
        for &w in &words[..n] {
            h = mix64(h ^ w).wrapping_add(round);
        }
    }
    h
}

/// The per-client table, in words the zone owns (all zero at the start).
pub struct ClientTable<'a> {
    words: &'a mut [u64],
}

impl<'a> ClientTable<'a> {
    /// `words` must hold [`TABLE_WORDS`] words (fewer: fewer clients);
    /// they are cleared here.
    pub fn new(words: &'a mut [u64]) -> Self {
        words.fill(0);
        ClientTable { words }
    }

    /// A table over words that already hold one (not cleared).
    pub fn resume(words: &'a mut [u64]) -> Self {
        ClientTable { words }
    }

    fn entries(&self) -> usize {
        self.words.len() / 4
    }

    /// The entry index of `client`, inserting it if there is room.
    fn find(&mut self, client: u32) -> Option<usize> {
        let n = self.entries();
        if n == 0 {
            return None;
        }
        let key = client as u64 + 1;
        let mut i = (mix64(key) as usize) % n;
        for _ in 0..n {
            let k = self.words[4 * i];
            if k == key {
                return Some(i);
            }
            if k == 0 {
                self.words[4 * i] = key;
                return Some(i);
            }
            i = (i + 1) % n;
        }
        None
    }

    /// The last sequence number applied for `client` (0: none).
    pub fn last_seq(&self, client: u32) -> u64 {
        let n = self.entries();
        if n == 0 {
            return 0;
        }
        let key = client as u64 + 1;
        let mut i = (mix64(key) as usize) % n;
        for _ in 0..n {
            match self.words[4 * i] {
                k if k == key => return self.words[4 * i + 1],
                0 => return 0,
                _ => i = (i + 1) % n,
            }
        }
        0
    }

    /// Applies `u` as member `clone_id` of `members` (1: not forked).
    pub fn apply(&mut self, u: &Update, cost: u64, clone_id: u64, members: u64) -> Applied {
        if u.payload.is_empty() || u.payload.len() as u64 > abi::UPDATE_PAYLOAD_MAX || u.seq == 0 {
            return Applied::Malformed;
        }
        if members > 1 && u.client as u64 % members != clone_id {
            return Applied::NotMine;
        }
        if self.last_seq(u.client) >= u.seq {
            return Applied::Duplicate;
        }
        let h = update_hash(u, cost);
        let Some(i) = self.find(u.client) else {
            return Applied::Malformed;
        };
        let e = &mut self.words[4 * i..4 * i + 4];
        e[1] = u.seq;
        e[2] += 1;
        e[3] = mix64(e[3] ^ h);
        Applied::Applied
    }

    /// The clients' effects: independent of the entries' order.
    pub fn digest(&self) -> u64 {
        let mut sum = 0u64;
        let mut used = 0u64;
        for e in self.words.chunks_exact(4) {
            if e[0] != 0 {
                used += 1;
                let m = mix64(e[0] ^ DIGEST_STREAM) ^ mix64(e[1] ^ mix64(e[2] ^ mix64(e[3])));
                sum = sum.wrapping_add(mix64(m));
            }
        }
        mix64(sum ^ used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(client: u32, seq: u64, p: &[u8]) -> Update<'_> {
        Update {
            client,
            seq,
            payload: p,
        }
    }

    #[test]
    fn duplicates_are_skipped_and_interleaving_does_not_matter() {
        let p = [7u8; 300];
        let (mut a, mut b) = (vec![0; 64], vec![0; 64]);
        let mut ta = ClientTable::new(&mut a);
        let mut tb = ClientTable::new(&mut b);
        assert_eq!(ta.apply(&up(1, 1, &p), 1, 0, 1), Applied::Applied);
        assert_eq!(ta.apply(&up(2, 1, &p), 1, 0, 1), Applied::Applied);
        assert_eq!(ta.apply(&up(1, 2, &p), 1, 0, 1), Applied::Applied);
        assert_eq!(ta.apply(&up(1, 2, &p), 1, 0, 1), Applied::Duplicate);
        assert_eq!(ta.apply(&up(1, 1, &p), 1, 0, 1), Applied::Duplicate);
        // Another interleaving of the same per-client sequences.
        tb.apply(&up(1, 1, &p), 1, 0, 1);
        tb.apply(&up(1, 2, &p), 1, 0, 1);
        tb.apply(&up(2, 1, &p), 1, 0, 1);
        assert_eq!(ta.digest(), tb.digest());
        assert_eq!(ta.last_seq(1), 2);
        // A different payload changes it.
        let mut c = vec![0; 64];
        let mut tc = ClientTable::new(&mut c);
        tc.apply(&up(1, 1, &p), 1, 0, 1);
        tc.apply(&up(1, 2, &[8u8; 300]), 1, 0, 1);
        tc.apply(&up(2, 1, &p), 1, 0, 1);
        assert_ne!(ta.digest(), tc.digest());
    }

    #[test]
    fn members_split_and_bad_updates() {
        let p = [1u8; 256];
        let mut w = vec![0; 8];
        let mut t = ClientTable::new(&mut w);
        assert_eq!(t.apply(&up(5, 1, &p), 1, 1, 3), Applied::NotMine);
        assert_eq!(t.apply(&up(4, 1, &p), 1, 1, 3), Applied::Applied);
        assert_eq!(t.apply(&up(5, 1, &p), 1, 2, 3), Applied::Applied);
        assert_eq!(t.apply(&up(6, 0, &p), 1, 0, 1), Applied::Malformed);
        assert_eq!(t.apply(&up(6, 1, &[]), 1, 0, 1), Applied::Malformed);
        assert_eq!(t.apply(&up(6, 1, &[0; 513]), 1, 0, 1), Applied::Malformed);
        // Two entries: full.
        assert_eq!(t.apply(&up(9, 1, &p), 1, 0, 1), Applied::Malformed);
        assert_ne!(update_hash(&up(1, 1, &p), 1), update_hash(&up(1, 1, &p), 2));
    }
}
