//! Counters: lock-free atomics inside, plain snapshots outside.

/// Declares a snapshot struct of `u64` fields and an atomic twin with a
/// `snapshot()` method.
macro_rules! counters {
    ($(#[$m:meta])* $snap:ident, $atom:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $snap { $($(#[$fm])* pub $f: u64,)* }

        impl $snap {
            /// Adds `other`'s counters to these (totals over several).
            pub fn add(&mut self, other: &$snap) {
                $( self.$f += other.$f; )*
            }

            /// These counters less `earlier`'s (saturating): what was
            /// counted after `earlier` was read.
            pub fn since(&self, earlier: &$snap) -> $snap {
                $snap { $( $f: self.$f.saturating_sub(earlier.$f), )* }
            }
        }

        #[derive(Debug, Default)]
        pub(crate) struct $atom { $(pub(crate) $f: std::sync::atomic::AtomicU64,)* }

        impl $atom {
            pub(crate) fn snapshot(&self) -> $snap {
                $snap { $($f: self.$f.load(std::sync::atomic::Ordering::Relaxed),)* }
            }
        }
    };
}
pub(crate) use counters;

/// Adds `n` to a counter.
pub(crate) fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Adds one to a counter.
pub(crate) fn bump(c: &std::sync::atomic::AtomicU64) {
    add(c, 1);
}

/// Sets a gauge.
pub(crate) fn set(c: &std::sync::atomic::AtomicU64, v: u64) {
    c.store(v, std::sync::atomic::Ordering::Relaxed);
}
