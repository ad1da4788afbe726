//! Spill-over rule: effective Maglev weights of a pool's backends for one client region.
//!
//! # The rule
//!
//! For one pool and one client region, each backend region `r` has a multiplier `m_r`
//! (0 = never send this client region there) and:
//!
//! - configured weight `W_r` = Σ weight of its backends; healthy weight `H_r` = Σ weight
//!   of its *usable* backends (not draining, down, ejected or disabled); `h_r = H_r / W_r`;
//! - configured share `S_r = m_r·W_r / Σ_q m_q·W_q`.
//!
//! A region with `h_r < spill_threshold` is *short*: it keeps `T_r = S_r·h_r`, and its
//! lost share `S_r·(1 − h_r)` goes to the regions that are not short and have `m·H > 0`,
//! in proportion to `m_q·H_q`. A region with `h_r ≥ spill_threshold` keeps its full
//! `S_r`, served by its remaining usable backends. If no non-short region has capacity,
//! the lost share goes to the short regions' remaining capacity in proportion to `m·H`,
//! so traffic flows while any usable backend with `m > 0` exists; if none does, every
//! weight is 0 and the caller fails fast. Within a region, `T_r` is split over its
//! usable backends in proportion to their weight, then scaled to [`SHARE_SCALE`] and
//! rounded; a backend with a positive target gets at least 1.
//!
//! # Worked example
//!
//! Backends `eu-1` (eu, 10), `eu-2` (eu, 10, down), `us-1` (us, 20), `ap-1` (ap, 20);
//! client region eu with multipliers eu=100, us=5, ap=1; threshold 1.0.
//!
//! - `W` = eu 20, us 20, ap 20; `H` = eu 10, us 20, ap 20; `h_eu` = 0.5, so eu is short.
//! - `m·W` = 2000, 100, 20 (sum 2120): `S` = eu 94.34 %, us 4.72 %, ap 0.94 %.
//! - eu keeps 94.34 % × 0.5 = 47.17 % and loses 47.17 %, split by `m·H` = us 100,
//!   ap 20: us +39.31 %, ap +7.86 %.
//! - Weights: `eu-1` 471698, `eu-2` 0, `us-1` 440252, `ap-1` 88050.
//!
//! With threshold 0.5 eu is not short (0.5 ≥ 0.5) and keeps its whole share on `eu-1`:
//! 943396, 0, 47170, 9434.
//!
//! # Determinism
//!
//! Per-region sums are exact integer sums, the float steps are evaluated per region
//! from those integers, and each backend's weight depends only on its own weight and
//! its region's result; so the output does not depend on backend order and, with
//! IEEE-754 arithmetic (no fused operations in Rust), is identical across machines.

use std::collections::BTreeMap;

use super::region_map::RegionId;

/// The integer weights of one geo row sum to about this (rounding may move it
/// slightly). Not [`crate::health::state::WEIGHT_SCALE`] (table units per unit
/// of configured weight): a row is shares of one client region's traffic, which
/// [`crate::health::state::apply_plan_to_share`] then scales by health.
pub const SHARE_SCALE: u32 = 1_000_000;

/// One backend of a pool as the spill-over rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeoBackend {
    /// The region the backend runs in.
    pub region: RegionId,
    /// Its configured weight.
    pub weight: u32,
    /// False when draining, down, ejected or disabled.
    pub usable: bool,
}

/// The spill threshold was outside (0, 1] or not a number.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("spill threshold {0} is outside (0, 1]")]
pub struct InvalidSpillThreshold(pub f64);

/// Healthy fraction below which a region spills its lost share to other regions.
///
/// In (0, 1]; the default 1.0 spills as soon as any capacity is lost. With 0.5 a region
/// keeps its full share (concentrated on its remaining backends) until more than half
/// of its weight is unusable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpillThreshold(f64);

// === impl SpillThreshold ===

impl SpillThreshold {
    /// Validates that `value` is in (0, 1].
    pub fn new(value: f64) -> Result<Self, InvalidSpillThreshold> {
        if value > 0.0 && value <= 1.0 {
            Ok(SpillThreshold(value))
        } else {
            Err(InvalidSpillThreshold(value))
        }
    }

    /// The threshold as a fraction.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for SpillThreshold {
    fn default() -> Self {
        SpillThreshold(1.0)
    }
}

/// Per-region totals; integers so that summing in any order gives the same result.
#[derive(Default)]
struct RegionTotals {
    configured: u64,
    healthy: u64,
    multiplier: u32,
    /// Fraction of the client region's traffic, filled in by the rule.
    target: f64,
}

/// Effective Maglev weight of each backend (same order as `backends`; 0 = not in the
/// table) for the client region whose multipliers are given by `multiplier`.
///
/// `multiplier` is called once per distinct backend region. All zeros means no usable
/// backend with a positive multiplier: the caller should fail fast. See the module docs
/// for the rule and a worked example.
pub fn effective_weights<F>(backends: &[GeoBackend], multiplier: F, threshold: SpillThreshold) -> Vec<u32>
where
    F: Fn(RegionId) -> u32,
{
    let mut regions: BTreeMap<RegionId, RegionTotals> = BTreeMap::new();
    for b in backends {
        let t = regions.entry(b.region).or_default();
        t.configured += u64::from(b.weight);
        if b.usable {
            t.healthy += u64::from(b.weight);
        }
    }
    for (&id, t) in regions.iter_mut() {
        t.multiplier = multiplier(id);
    }

    let mw = |t: &RegionTotals| u128::from(t.multiplier) * u128::from(t.configured);
    let mh = |t: &RegionTotals| u128::from(t.multiplier) * u128::from(t.healthy);
    let is_short = |t: &RegionTotals| (t.healthy as f64) < threshold.0 * (t.configured as f64);

    let total: u128 = regions.values().map(mw).sum();
    // Lost share, as a numerator over `total`.
    let lost: u128 = regions.values().filter(|t| is_short(t)).map(|t| mw(t) - mh(t)).sum();
    let mut receivers_short = false;
    let mut capacity: u128 = regions.values().filter(|t| !is_short(t)).map(mh).sum();
    if capacity == 0 {
        receivers_short = true;
        capacity = regions.values().filter(|t| is_short(t)).map(mh).sum();
    }
    if total == 0 || capacity == 0 {
        return vec![0; backends.len()];
    }

    let total_f = total as f64;
    let lost_f = lost as f64 / total_f;
    for t in regions.values_mut() {
        let short = is_short(t);
        let kept = if short { mh(t) } else { mw(t) };
        let gain = if short == receivers_short && mh(t) > 0 {
            lost_f * (mh(t) as f64 / capacity as f64)
        } else {
            0.0
        };
        t.target = kept as f64 / total_f + gain;
    }

    backends
        .iter()
        .map(|b| {
            let t = &regions[&b.region];
            if !b.usable || b.weight == 0 || t.target <= 0.0 {
                return 0;
            }
            // healthy > 0 here: this backend is usable with a positive weight.
            let share = t.target * (f64::from(b.weight) / t.healthy as f64);
            // Saturating float→int cast; share <= 1 so it stays within SHARE_SCALE.
            ((share * f64::from(SHARE_SCALE)).round() as u32).max(1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EU: RegionId = RegionId(1);
    const US: RegionId = RegionId(2);
    const AP: RegionId = RegionId(3);

    fn be(region: RegionId, weight: u32, usable: bool) -> GeoBackend {
        GeoBackend { region, weight, usable }
    }

    fn mult(pairs: &[(RegionId, u32)]) -> impl Fn(RegionId) -> u32 + '_ {
        move |r| pairs.iter().find(|(q, _)| *q == r).map_or(0, |&(_, m)| m)
    }

    fn th(v: f64) -> SpillThreshold {
        SpillThreshold::new(v).unwrap()
    }

    fn worked_example_backends() -> Vec<GeoBackend> {
        vec![be(EU, 10, true), be(EU, 10, false), be(US, 20, true), be(AP, 20, true)]
    }

    #[test]
    fn worked_example() {
        let m = [(EU, 100), (US, 5), (AP, 1)];
        let w = effective_weights(&worked_example_backends(), mult(&m), th(1.0));
        assert_eq!(w, vec![471698, 0, 440252, 88050]);
        let w = effective_weights(&worked_example_backends(), mult(&m), th(0.5));
        assert_eq!(w, vec![943396, 0, 47170, 9434]);
    }

    #[test]
    fn all_healthy_is_weight_times_multiplier() {
        let b = [be(EU, 10, true), be(EU, 30, true), be(US, 20, true), be(US, 40, true)];
        let w = effective_weights(&b, mult(&[(EU, 100), (US, 5)]), th(1.0));
        // weight × multiplier = 1000, 3000, 100, 200 of 4300.
        let expect: Vec<u32> = [1000.0f64, 3000.0, 100.0, 200.0]
            .iter()
            .map(|x| (x / 4300.0 * 1e6).round() as u32)
            .collect();
        assert_eq!(w, expect);
    }

    #[test]
    fn half_of_eu_down_moves_that_share_to_us() {
        let b = [be(EU, 10, true), be(EU, 10, false), be(US, 10, true), be(US, 10, true)];
        let w = effective_weights(&b, mult(&[(EU, 100), (US, 5)]), th(1.0));
        // S_eu = 2000/2100; eu keeps half of it, the other half goes to us.
        let eu = 1000.0 / 2100.0;
        let us = 1.0 - eu;
        let r = |x: f64| (x * 1e6).round() as u32;
        assert_eq!(w, vec![r(eu), 0, r(us / 2.0), r(us / 2.0)]);
    }

    #[test]
    fn all_eu_down_sends_everything_to_us() {
        let b = [be(EU, 10, false), be(EU, 10, false), be(US, 10, true), be(US, 30, true)];
        let w = effective_weights(&b, mult(&[(EU, 100), (US, 5)]), th(1.0));
        assert_eq!(w, vec![0, 0, 250_000, 750_000]);
    }

    #[test]
    fn zero_multiplier_never_gets_traffic() {
        let b = [be(EU, 10, false), be(US, 10, true), be(AP, 50, true)];
        let w = effective_weights(&b, mult(&[(EU, 100), (US, 5), (AP, 0)]), th(1.0));
        assert_eq!(w, vec![0, 1_000_000, 0]);
        // Nothing usable with m > 0: all zero, even though ap is up.
        let b = [be(EU, 10, false), be(US, 10, false), be(AP, 50, true)];
        let w = effective_weights(&b, mult(&[(EU, 100), (US, 5), (AP, 0)]), th(1.0));
        assert_eq!(w, vec![0, 0, 0]);
    }

    #[test]
    fn threshold_keeps_full_share_until_below_it() {
        let m = [(EU, 100), (US, 5)];
        let pool = |eu_up: usize| -> Vec<GeoBackend> {
            let mut b: Vec<_> = (0..4).map(|i| be(EU, 10, i < eu_up)).collect();
            b.push(be(US, 40, true));
            b
        };
        // 2 of 4 up = exactly 50 %: not short, eu keeps 4000/4200 on two backends.
        let w = effective_weights(&pool(2), mult(&m), th(0.5));
        let eu = 4000.0 / 4200.0;
        let r = |x: f64| (x * 1e6).round() as u32;
        assert_eq!(w, vec![r(eu / 2.0), r(eu / 2.0), 0, 0, r(1.0 - eu)]);
        // 1 of 4 up = 25 %: short, keeps a quarter of its share.
        let w = effective_weights(&pool(1), mult(&m), th(0.5));
        let eu = 1000.0 / 4200.0;
        assert_eq!(w, vec![r(eu), 0, 0, 0, r(1.0 - eu)]);
        // With the default threshold 3 of 4 already spills.
        let w = effective_weights(&pool(3), mult(&m), SpillThreshold::default());
        let eu = 3000.0 / 4200.0;
        assert_eq!(w[0], r(eu / 3.0));
        assert_eq!(w[4], r(1.0 - eu));
    }

    #[test]
    fn all_regions_short_spill_among_themselves() {
        let b = [be(EU, 10, true), be(EU, 30, false), be(US, 10, true), be(US, 10, false)];
        // m·H: eu 100·10 = 1000, us 5·10 = 50; everything goes there in that ratio.
        let w = effective_weights(&b, mult(&[(EU, 100), (US, 5)]), th(1.0));
        let r = |x: f64| (x * 1e6).round() as u32;
        assert_eq!(w, vec![r(1000.0 / 1050.0), 0, r(50.0 / 1050.0), 0]);
    }

    #[test]
    fn tiny_positive_targets_get_at_least_one() {
        let b = [be(EU, u32::MAX, true), be(US, 1, true)];
        let w = effective_weights(&b, mult(&[(EU, u32::MAX), (US, 1)]), th(1.0));
        assert_eq!(w, vec![1_000_000, 1]);
    }

    #[test]
    fn empty_and_zero_weight_pools() {
        assert!(effective_weights(&[], |_| 1, th(1.0)).is_empty());
        let b = [be(EU, 0, true), be(US, 0, true)];
        assert_eq!(effective_weights(&b, |_| 1, th(1.0)), vec![0, 0]);
        let b = [be(EU, 0, true), be(US, 5, true)];
        assert_eq!(effective_weights(&b, |_| 1, th(1.0)), vec![0, 1_000_000]);
    }

    #[test]
    fn threshold_bounds() {
        assert!(SpillThreshold::new(0.0).is_err());
        assert!(SpillThreshold::new(1.01).is_err());
        assert!(SpillThreshold::new(f64::NAN).is_err());
        assert_eq!(SpillThreshold::new(1.0).unwrap(), SpillThreshold::default());
        assert_eq!(
            SpillThreshold::new(2.0).unwrap_err().to_string(),
            "spill threshold 2 is outside (0, 1]"
        );
    }

    fn backend() -> impl Strategy<Value = GeoBackend> {
        (0u16..5, 0u32..1000, prop::bool::weighted(0.7)).prop_map(|(r, weight, usable)| GeoBackend {
            region: RegionId(r),
            weight,
            usable,
        })
    }

    proptest! {
        #[test]
        fn order_independent_and_conserving(
            backends in prop::collection::vec(backend(), 0..40),
            mults in prop::collection::vec(0u32..200, 5),
            t in 1u32..=100,
            seed in any::<u64>(),
        ) {
            let m = |r: RegionId| mults[r.0 as usize];
            let threshold = th(f64::from(t) / 100.0);
            let w = effective_weights(&backends, m, threshold);

            // Same input in another order: each backend keeps its weight.
            let mut perm: Vec<usize> = (0..backends.len()).collect();
            let mut s = seed | 1;
            for i in (1..perm.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                perm.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let shuffled: Vec<_> = perm.iter().map(|&i| backends[i]).collect();
            let w2 = effective_weights(&shuffled, m, threshold);
            for (j, &i) in perm.iter().enumerate() {
                prop_assert_eq!(w2[j], w[i]);
            }

            // Only usable, positive-weight, m > 0 backends get traffic; totals are
            // SHARE_SCALE up to rounding, or zero when nothing can serve.
            let any_capacity = backends.iter().any(|b| b.usable && b.weight > 0 && m(b.region) > 0);
            for (b, &x) in backends.iter().zip(&w) {
                if x > 0 {
                    prop_assert!(b.usable && b.weight > 0 && m(b.region) > 0);
                }
            }
            let sum: u64 = w.iter().map(|&x| u64::from(x)).sum();
            if any_capacity {
                let slack = backends.len() as u64;
                prop_assert!(sum + slack >= 1_000_000 && sum <= 1_000_000 + slack, "sum {}", sum);
            } else {
                prop_assert_eq!(sum, 0);
            }
        }
    }
}
