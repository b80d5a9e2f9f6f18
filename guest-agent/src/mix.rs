//! Deterministic mixing: the zone's pseudo-random streams and checksums.

/// splitmix64's finalizer: a bijective 64-bit mix.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64 generator: every stream is a function of its seed only.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub const fn new(seed: u64) -> Self {
        Rng(seed)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// A value in `0..n` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// Fletcher-style fold of 64-bit words: order-sensitive, two adds per word,
/// so a full scan of the zone state runs at memory speed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fold {
    a: u64,
    b: u64,
}

impl Fold {
    pub fn add_words(&mut self, words: &[u64]) {
        let (mut a, mut b) = (self.a, self.b);
        for &w in words {
            a = a.wrapping_add(w);
            b = b.wrapping_add(a);
        }
        self.a = a;
        self.b = b;
    }

    pub fn finish(&self) -> u64 {
        mix64(self.a ^ mix64(self.b))
    }
}
