//! Family keys, datagram MACs and the replay window.
//!
//! Every fork family has a [`FamilyKey`]: a random 64-bit id (the wire's
//! `family` field) and a 32-byte random secret. Each datagram, request or
//! reply, ends in a 16-byte tag: the BLAKE3 keyed hash (key = the family
//! secret) of everything before it, truncated. The header the tag covers
//! holds the magic, version and kind, so a reply can never pass for a
//! request. Whoever lacks the secret can neither read a family's pages nor
//! make the server send anything (see [`crate::server`] for why that bounds
//! amplification).
//!
//! Replays: each [`crate::client::PageClient`] picks a random 64-bit client
//! id and numbers its requests 1, 2, 3, …; the server keeps, per family and
//! client, the highest number seen and a 128-bit window of the ones below it
//! ([`ReplayGuard`]), and drops a request whose number it has seen or that
//! is older than the window. The state is bounded: at most
//! [`MAX_CLIENTS_PER_FAMILY`] clients per family, and entries are made only
//! for requests whose MAC verified (so only secret holders use them).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::sync::lock;

/// Length of a family secret.
pub const SECRET_LEN: usize = 32;
/// Length of the MAC tag that ends every datagram.
pub const TAG_LEN: usize = 16;
/// Distinct clients whose replay windows a family keeps; requests of
/// further clients are dropped (a family's clients are its clones' fault
/// handlers and prefetchers: a few per clone).
pub const MAX_CLIENTS_PER_FAMILY: usize = 4096;
/// Sequence numbers below the highest one seen that are still accepted
/// once (reordering on the path).
pub const REPLAY_WINDOW: u64 = 128;

/// Getting random bytes from the operating system failed.
#[derive(Debug, thiserror::Error)]
#[error("reading random bytes from the operating system failed: {0}")]
pub struct RandomError(#[source] getrandom::Error);

/// Fills `buf` from the OS's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(RandomError)
}

/// A random 64-bit number from the OS's random source.
pub fn random_u64() -> Result<u64, RandomError> {
    let mut b = [0u8; 8];
    fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A fork family's id and secret. `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct FamilyKey {
    id: u64,
    secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for FamilyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamilyKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FamilyKey {
    /// A fresh key: random id and random secret.
    pub fn generate() -> Result<FamilyKey, RandomError> {
        let mut secret = [0u8; SECRET_LEN];
        fill_random(&mut secret)?;
        Ok(FamilyKey {
            id: random_u64()?,
            secret,
        })
    }

    /// A key from its parts (e.g. received in a descriptor).
    pub fn from_parts(id: u64, secret: [u8; SECRET_LEN]) -> FamilyKey {
        FamilyKey { id, secret }
    }

    /// The family id carried in every datagram's header.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The secret, for handing the key to a clone (keep it off logs).
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// The tag of `data` under this key.
    pub fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let hash = blake3::keyed_hash(&self.secret, data);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is the tag of `data` (constant time in the tag).
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let want = self.tag(data);
        tag.len() == TAG_LEN && want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Why [`ReplayGuard::accept`] refused a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Seen before, or older than the window (or 0, never sent).
    Replayed,
    /// The family keeps windows for [`MAX_CLIENTS_PER_FAMILY`] clients.
    TooManyClients,
}

/// One client's window: the highest sequence number seen and a bitmap of
/// the [`REPLAY_WINDOW`] numbers up to it (bit `k`: `top - k` seen).
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    top: u64,
    seen: u128,
}

impl Window {
    fn accept(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = seq;
            return true;
        }
        let back = self.top - seq;
        if back >= REPLAY_WINDOW || self.seen & (1 << back) != 0 {
            return false;
        }
        self.seen |= 1 << back;
        true
    }
}

/// The replay windows of one family's clients (bounded, see module docs).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    clients: Mutex<HashMap<u64, Window>>,
}

impl ReplayGuard {
    /// Accepts `seq` from `client` once. Call only for authenticated
    /// datagrams.
    pub fn accept(&self, client: u64, seq: u64) -> Result<(), Refusal> {
        let mut clients = lock(&self.clients);
        let len = clients.len();
        let window = match clients.get_mut(&client) {
            Some(w) => w,
            None if len >= MAX_CLIENTS_PER_FAMILY => return Err(Refusal::TooManyClients),
            None => clients.entry(client).or_default(),
        };
        if window.accept(seq) {
            Ok(())
        } else {
            Err(Refusal::Replayed)
        }
    }

    /// Clients with a window.
    pub fn clients(&self) -> usize {
        lock(&self.clients).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_redacted() {
        let a = FamilyKey::generate().expect("key");
        let b = FamilyKey::generate().expect("key");
        assert_ne!(a.id(), b.id());
        assert_ne!(a.secret(), b.secret());
        let shown = format!("{a:?}");
        assert!(shown.contains("redacted") && !shown.contains(&format!("{:?}", a.secret())));
    }

    #[test]
    fn tags_verify_only_under_their_key_and_data() {
        let k = FamilyKey::from_parts(1, [7; SECRET_LEN]);
        let other = FamilyKey::from_parts(1, [8; SECRET_LEN]);
        let tag = k.tag(b"hello");
        assert!(k.verify(b"hello", &tag));
        assert!(!k.verify(b"hellp", &tag));
        assert!(!other.verify(b"hello", &tag));
        assert!(!k.verify(b"hello", &tag[..TAG_LEN - 1]));
    }

    #[test]
    fn window_accepts_each_number_once() {
        let g = ReplayGuard::default();
        assert_eq!(g.accept(1, 0), Err(Refusal::Replayed));
        for s in [5, 3, 4, 1, 2, 6] {
            assert_eq!(g.accept(1, s), Ok(()), "seq {s}");
        }
        for s in 1..=6 {
            assert_eq!(g.accept(1, s), Err(Refusal::Replayed), "seq {s}");
        }
        // Another client has its own window.
        assert_eq!(g.accept(2, 3), Ok(()));
        // Far ahead: the old numbers fall out of the window and are refused.
        assert_eq!(g.accept(1, 1000), Ok(()));
        assert_eq!(g.accept(1, 1000 - REPLAY_WINDOW), Err(Refusal::Replayed));
        assert_eq!(g.accept(1, 1001 - REPLAY_WINDOW), Ok(()));
        assert_eq!(g.accept(1, 999), Ok(()));
        assert_eq!(g.accept(1, 999), Err(Refusal::Replayed));
        assert_eq!(g.clients(), 2);
    }

    #[test]
    fn clients_are_bounded() {
        let g = ReplayGuard::default();
        for c in 0..MAX_CLIENTS_PER_FAMILY as u64 {
            g.accept(c, 1).expect("room");
        }
        assert_eq!(
            g.accept(u64::MAX, 1),
            Err(Refusal::TooManyClients),
            "a new client past the bound"
        );
        assert_eq!(g.accept(0, 2), Ok(()), "known clients go on");
    }
}
