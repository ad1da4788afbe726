//! The model's seeded pseudo-random source (check jitter): no clock read,
//! so a model replays exactly from its seed.

use std::time::Duration;

/// splitmix64: enough to spread checks of many backends, no RNG dependency.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// A delay in `[0, max)` (zero when `max` is zero).
    pub fn jitter(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % max.as_nanos().min(u128::from(u64::MAX)) as u64)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_delays_within_bounds() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let max = Duration::from_millis(250);
        for _ in 0..100 {
            let d = a.jitter(max);
            assert!(d < max);
            assert_eq!(d, b.jitter(max));
        }
        assert_eq!(Rng::new(1).jitter(Duration::ZERO), Duration::ZERO);
    }
}
