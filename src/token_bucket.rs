//! Integer fixed-point token bucket: pure, exact, driven by a caller-supplied `now`.

use std::time::Instant;

/// One token expressed in the bucket's fixed-point unit (atto-tokens, 1e-18 token).
///
/// With the rate stored in nano-tokens per second (= atto-tokens per nanosecond), a refill
/// is one `u64 x u64 -> u128` multiply with no division, so no remainder is ever rounded
/// away: the bucket never drifts however often it is refilled.
pub(crate) const ATTO_PER_TOKEN: u128 = 1_000_000_000_000_000_000;

/// Rate granularity: rates are rounded to a multiple of 1e-9 token per second.
const NANO_PER_TOKEN: f64 = 1e9;

/// Why a [`BucketParams`] was rejected.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum InvalidBucketParams {
    /// The rate was zero, negative, NaN or infinite.
    #[error("rate must be a finite number > 0 tokens/s, got {0}")]
    RateNotPositive(f64),
    /// The rate was outside [`BucketParams::MIN_RATE`, `BucketParams::MAX_RATE`].
    #[error("rate {0} tokens/s is outside [1e-9, 1e9] tokens/s")]
    RateOutOfRange(f64),
    /// A burst of 0 would refuse everything.
    #[error("burst must be at least 1 token")]
    ZeroBurst,
}

/// Rate and capacity shared by many [`TokenBucket`]s (kept out of each bucket so a bucket
/// stays 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketParams {
    rate: f64,
    burst: u32,
    /// Refill per nanosecond in atto-tokens (numerically: nano-tokens per second).
    atto_per_ns: u64,
    capacity_atto: u128,
    /// Nanoseconds to refill one token, rounded up: the overflow sketch's unit
    /// (rounding up makes the sketch at most as generous as an exact bucket).
    ns_per_token: u64,
}

impl BucketParams {
    /// Lowest accepted rate, tokens per second (the fixed-point resolution).
    pub const MIN_RATE: f64 = 1e-9;
    /// Highest accepted rate, tokens per second (far above any packet rate).
    pub const MAX_RATE: f64 = 1e9;

    /// Validates `rate` (tokens per second, finite, in [`Self::MIN_RATE`,
    /// `Self::MAX_RATE`], fractions such as 0.1 allowed) and `burst` (capacity, >= 1).
    ///
    /// The rate is rounded to the nearest 1e-9 token/s; 0.2/s is represented exactly.
    pub fn new(rate: f64, burst: u32) -> Result<Self, InvalidBucketParams> {
        if !rate.is_finite() || rate <= 0.0 {
            return Err(InvalidBucketParams::RateNotPositive(rate));
        }
        if !(Self::MIN_RATE..=Self::MAX_RATE).contains(&rate) {
            return Err(InvalidBucketParams::RateOutOfRange(rate));
        }
        if burst == 0 {
            return Err(InvalidBucketParams::ZeroBurst);
        }
        // In range [1, 1e18] after the checks above, so the cast cannot truncate.
        let atto_per_ns = (rate * NANO_PER_TOKEN).round().max(1.0) as u64;
        // <= 1e18 (atto_per_ns >= 1), so it fits a u64.
        let ns_per_token = ATTO_PER_TOKEN.div_ceil(u128::from(atto_per_ns)) as u64;
        Ok(Self {
            rate,
            burst,
            atto_per_ns,
            capacity_atto: u128::from(burst) * ATTO_PER_TOKEN,
            ns_per_token,
        })
    }

    /// Refill rate in tokens per second, as configured.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Capacity in tokens.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Capacity in atto-tokens.
    pub(crate) fn capacity_atto(&self) -> u128 {
        self.capacity_atto
    }

    /// Nanoseconds per token, rounded up (see the field).
    pub(crate) fn ns_per_token(&self) -> u64 {
        self.ns_per_token
    }
}

/// A token bucket's mutable state: 32 bytes, parameters supplied on every call.
///
/// Time only moves forward: a `now` equal to or earlier than the last one seen adds no
/// tokens and does not rewind the bucket, so a non-monotonic caller cannot mint tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens available at `last`, in atto-tokens, never above the capacity.
    atto: u128,
    last: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens at `now`.
    ///
    /// It starts full rather than carrying `params`, so the capacity is applied lazily at
    /// the first refill (`u128::MAX` saturates down to whatever the burst is).
    pub fn new_full(now: Instant) -> Self {
        Self {
            atto: u128::MAX,
            last: now,
        }
    }

    /// A bucket holding `atto` atto-tokens (clamped to the capacity at the first refill)
    /// at `now`: a source that moves from the overflow sketch to an exact entry starts
    /// from what the sketch knew, not from a fresh burst.
    pub(crate) fn with_atto(atto: u128, now: Instant) -> Self {
        Self { atto, last: now }
    }

    /// Takes one token if available at `now`; returns whether it did.
    pub fn try_take(&mut self, params: &BucketParams, now: Instant) -> bool {
        let (atto, last) = self.refilled(params, now);
        self.last = last;
        if atto >= ATTO_PER_TOKEN {
            self.atto = atto - ATTO_PER_TOKEN;
            true
        } else {
            self.atto = atto;
            false
        }
    }

    /// Whether the bucket is back at `burst` at `now`: such a bucket carries no
    /// information (a fresh one would be identical), so dropping it is harmless.
    pub fn is_full_at(&self, params: &BucketParams, now: Instant) -> bool {
        self.refilled(params, now).0 >= params.capacity_atto
    }

    /// Whether at least one token is available at `now`, i.e. the source is not being
    /// limited right now.
    pub fn has_token_at(&self, params: &BucketParams, now: Instant) -> bool {
        self.refilled(params, now).0 >= ATTO_PER_TOKEN
    }

    /// Tokens available at `now`, for diagnostics and victim selection.
    pub fn tokens_at(&self, params: &BucketParams, now: Instant) -> f64 {
        self.refilled(params, now).0 as f64 / ATTO_PER_TOKEN as f64
    }

    /// State after refilling up to `now` (clamped to capacity), without mutating.
    #[inline]
    fn refilled(&self, params: &BucketParams, now: Instant) -> (u128, Instant) {
        match now.checked_duration_since(self.last) {
            Some(elapsed) => {
                // Saturate instead of overflowing: after 584 years of idleness the bucket
                // is simply full, and u64 x u64 always fits in u128.
                let ns = elapsed
                    .as_secs()
                    .saturating_mul(1_000_000_000)
                    .saturating_add(u64::from(elapsed.subsec_nanos()));
                let added = u128::from(ns) * u128::from(params.atto_per_ns);
                let atto = self.atto.saturating_add(added).min(params.capacity_atto);
                (atto, now)
            }
            // `now` before `last`: the clock is treated as not moving; keeping the later
            // `last` means the interval is not counted twice when time catches up.
            None => (self.atto.min(params.capacity_atto), self.last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn p(rate: f64, burst: u32) -> BucketParams {
        BucketParams::new(rate, burst).unwrap()
    }

    fn drain(b: &mut TokenBucket, params: &BucketParams, now: Instant) -> u32 {
        let mut n = 0;
        while b.try_take(params, now) {
            n += 1;
        }
        n
    }

    #[test]
    fn size_is_small() {
        assert!(std::mem::size_of::<TokenBucket>() <= 32);
    }

    #[test]
    fn validates_params() {
        assert_eq!(
            BucketParams::new(0.0, 1),
            Err(InvalidBucketParams::RateNotPositive(0.0))
        );
        assert!(matches!(
            BucketParams::new(f64::NAN, 1),
            Err(InvalidBucketParams::RateNotPositive(_))
        ));
        assert!(BucketParams::new(f64::INFINITY, 1).is_err());
        assert!(BucketParams::new(-1.0, 1).is_err());
        assert_eq!(
            BucketParams::new(1e-12, 1),
            Err(InvalidBucketParams::RateOutOfRange(1e-12))
        );
        assert!(BucketParams::new(2e9, 1).is_err());
        assert_eq!(BucketParams::new(1.0, 0), Err(InvalidBucketParams::ZeroBurst));
        let ok = p(0.1, 3);
        assert_eq!((ok.rate(), ok.burst()), (0.1, 3));
    }

    #[test]
    fn burst_then_refill() {
        let params = p(10.0, 5);
        let t0 = Instant::now();
        let mut b = TokenBucket::new_full(t0);
        assert!(b.is_full_at(&params, t0));
        assert_eq!(drain(&mut b, &params, t0), 5);
        assert!(!b.is_full_at(&params, t0));
        // 10/s: one token every 100 ms, not before.
        assert!(!b.try_take(&params, t0 + Duration::from_millis(99)));
        assert!(b.try_take(&params, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(&params, t0 + Duration::from_millis(100)));
        // 1 s later: 10 tokens accrued but capped at the burst of 5.
        let t1 = t0 + Duration::from_millis(1100);
        assert!(b.is_full_at(&params, t1));
        assert_eq!(b.tokens_at(&params, t1), 5.0);
        assert_eq!(drain(&mut b, &params, t1), 5);
    }

    #[test]
    fn many_small_refills_do_not_drift() {
        // 3/s does not divide a nanosecond evenly in tokens; the exact arithmetic must
        // still give exactly 3 tokens per second however finely time is sliced.
        let params = p(3.0, 1);
        let t0 = Instant::now();
        let mut b = TokenBucket::new_full(t0);
        assert!(b.try_take(&params, t0));
        let mut admitted = 0;
        for us in 1..=10_000_000u64 / 7 {
            if b.try_take(&params, t0 + Duration::from_nanos(us * 7_000)) {
                admitted += 1;
            }
        }
        // 9_999_999 us elapsed: 29.99... tokens, so exactly 29 admitted.
        assert_eq!(admitted, 29);
    }

    #[test]
    fn sub_one_rate_is_exact() {
        // 0.2/s: exactly one token every 5 s.
        let params = p(0.2, 1);
        let t0 = Instant::now();
        let mut b = TokenBucket::new_full(t0);
        assert!(b.try_take(&params, t0));
        for k in 1..=100u64 {
            let due = t0 + Duration::from_secs(5 * k);
            assert!(!b.try_take(&params, due - Duration::from_nanos(1)), "k={k}");
            assert!(b.try_take(&params, due), "k={k}");
            assert!(!b.try_take(&params, due));
        }
        // 0.1/s: one per 10 s.
        let params = p(0.1, 2);
        let mut b = TokenBucket::new_full(t0);
        assert_eq!(drain(&mut b, &params, t0), 2);
        assert!(!b.try_take(&params, t0 + Duration::from_millis(9_999)));
        assert!(b.try_take(&params, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn long_idle_saturates_without_overflow() {
        let params = p(BucketParams::MAX_RATE, u32::MAX);
        let t0 = Instant::now();
        let mut b = TokenBucket::new_full(t0);
        assert!(b.try_take(&params, t0));
        let later = t0 + Duration::from_secs(50 * 365 * 24 * 3600);
        assert!(b.is_full_at(&params, later));
        assert_eq!(b.tokens_at(&params, later), f64::from(u32::MAX));
        assert!(b.try_take(&params, later));
        // Beyond u64 nanoseconds (584 years) the elapsed time saturates.
        let much_later = t0 + Duration::from_secs(1000 * 365 * 24 * 3600);
        assert!(b.is_full_at(&params, much_later));
        assert!(b.try_take(&params, much_later));
    }

    #[test]
    fn clock_standing_still_or_backwards_mints_nothing() {
        let params = p(1.0, 2);
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new_full(t0);
        assert_eq!(drain(&mut b, &params, t0), 2);
        // Same instant again, and earlier instants: no tokens, no panic.
        assert!(!b.try_take(&params, t0));
        assert!(!b.try_take(&params, t0 - Duration::from_secs(5)));
        assert_eq!(b.tokens_at(&params, t0 - Duration::from_secs(5)), 0.0);
        assert!(!b.is_full_at(&params, t0 - Duration::from_secs(9)));
        // The backwards call must not have rewound `last`: exactly 1 token 1 s after t0.
        assert!(b.try_take(&params, t0 + Duration::from_secs(1)));
        assert!(!b.try_take(&params, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn lowered_burst_applies_to_existing_buckets() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_full(t0);
        let big = p(1.0, 10);
        assert!(b.try_take(&big, t0));
        let small = p(1.0, 2);
        assert_eq!(b.tokens_at(&small, t0), 2.0);
        assert_eq!(drain(&mut b, &small, t0), 2);
    }

    proptest::proptest! {
        /// Over any schedule, admits never exceed burst + rate x elapsed.
        #[test]
        fn never_exceeds_burst_plus_rate(
            rate_milli in 1u64..100_000,
            burst in 1u32..50,
            steps in proptest::collection::vec(0u64..2_000_000_000, 1..200),
        ) {
            let params = p(rate_milli as f64 / 1000.0, burst);
            let t0 = Instant::now();
            let mut b = TokenBucket::new_full(t0);
            let mut elapsed = 0u64;
            let mut admitted = 0u64;
            for step in steps {
                elapsed += step;
                if b.try_take(&params, t0 + Duration::from_nanos(elapsed)) {
                    admitted += 1;
                }
            }
            let bound = u128::from(burst) + u128::from(elapsed) * u128::from(rate_milli) / 1_000_000_000_000;
            proptest::prop_assert!(u128::from(admitted) <= bound);
        }
    }
}
