//! Admission control: per-source token buckets and connection-count limits (pure logic
//! over the config's limits; the bucket itself is [`crate::token_bucket`]).
//!
//! Nothing here reads a clock or touches a socket: every time-dependent call takes
//! `now: Instant`, so the logic is deterministic under test and fuzzing.

pub mod limits;
pub mod source_table;

use std::sync::atomic::{AtomicUsize, Ordering};

pub use source_table::{Admission, SourceKey, SourceTable, SourceTableStats, DEFAULT_MAX_SOURCES};
// The bucket itself is below config (whose rate limits hold its parameters).
pub use crate::token_bucket::{BucketParams, InvalidBucketParams, TokenBucket};

/// A process-wide cap on concurrent connections (per listener, backend or source),
/// shared by all workers.
///
/// The count can never exceed `max`, not even transiently: acquiring is a
/// compare-and-increment, not an increment followed by a check and a rollback.
#[derive(Debug)]
pub struct ConnLimit {
    current: AtomicUsize,
    /// Atomic so a backend's limit can follow `ctl`/reload changes in place
    /// ([`ConnLimit::set_max`]); a listener's never changes.
    max: AtomicUsize,
}

impl ConnLimit {
    /// A limit admitting at most `max` concurrent holders (`max = 0` refuses all).
    pub fn new(max: usize) -> Self {
        Self {
            current: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Takes a slot if fewer than `max` are held; every `true` must be paired with one
    /// [`ConnLimit::release`].
    #[inline]
    pub fn try_acquire(&self) -> bool {
        // Relaxed suffices: the counter guards no other memory, and read-modify-write
        // operations on one atomic are totally ordered whatever the ordering argument.
        let max = self.max.load(Ordering::Relaxed);
        self.current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Returns a slot taken by a successful [`ConnLimit::try_acquire`].
    ///
    /// An unpaired release is a bug (debug builds panic); release builds saturate at zero
    /// instead of wrapping, which would otherwise block every later acquire.
    #[inline]
    pub fn release(&self) {
        let prev = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        debug_assert!(prev.is_ok(), "ConnLimit::release without acquire");
    }

    /// Slots currently held.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the maximum. Slots already held stay held (and are released
    /// as usual); a lower maximum only refuses new ones until enough left.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_up_to_max_then_release() {
        let l = ConnLimit::new(2);
        assert!(l.try_acquire());
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        assert_eq!(l.current(), 2);
        l.release();
        assert!(l.try_acquire());
        assert!(!ConnLimit::new(0).try_acquire());
    }

    #[test]
    fn threads_never_exceed_max() {
        let l = ConnLimit::new(3);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50_000 {
                        if l.try_acquire() {
                            let held = l.current();
                            assert!(held <= 3, "{held} > 3");
                            peak.fetch_max(held, Ordering::Relaxed);
                            l.release();
                        }
                    }
                });
            }
        });
        assert_eq!(l.current(), 0);
        assert!(peak.load(Ordering::Relaxed) <= 3);
    }
}
