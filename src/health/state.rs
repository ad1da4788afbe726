//! Pure backend health logic: rise/fall checks, outlier ejection, slow start, pool weights.
//!
//! Nothing here reads a clock or touches a socket: every time-dependent call takes
//! `now: Instant`, so the control-plane thread drives it and tests can replay any timeline.

use std::time::{Duration, Instant};

/// Factor applied to configured weights before they reach the Maglev builder.
///
/// Maglev normalises weights by the largest one, so a slow-starting backend of weight 1
/// at 10% must still be representable: weight `w` at full strength becomes `w * 1000`,
/// and at `p` permille of slow start becomes `w * p`.
pub const WEIGHT_SCALE: u32 = 1000;

/// A geo row's share `share` of a backend (in [`crate::geo::SHARE_SCALE`]
/// units) scaled by the health plan: `plan` is the backend's planned table
/// weight, `configured` its configured weight, so `plan / (configured *
/// WEIGHT_SCALE)` is the fraction health leaves it (slow start, 0 when
/// down). A backend with any share keeps at least 1, so slow start never
/// rounds it out of a region it serves. The one place geo and health
/// compose.
pub fn apply_plan_to_share(share: u32, plan: u32, configured: u32) -> u32 {
    let full = u64::from(configured) * u64::from(WEIGHT_SCALE);
    if plan == 0 || full == 0 {
        return 0;
    }
    ((u64::from(share) * u64::from(plan) / full).max(u64::from(share > 0))) as u32
}

/// Slow-start fraction meaning "full weight".
pub const PERMILLE_FULL: u32 = 1000;

/// Default panic threshold (Envoy's 50%).
pub const DEFAULT_PANIC_THRESHOLD: f64 = 0.5;

/// Default number of slow-start steps (10% each).
pub const DEFAULT_SLOW_START_STEPS: u32 = 10;

// === impl AdminState ===

/// Operator intent, set by config / control commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdminState {
    /// Takes new connections when healthy.
    #[default]
    Enabled,
    /// Keeps its established connections but takes no new ones.
    Draining,
    /// Out of service; takes no new connections.
    Disabled,
}

// === impl ActiveCheck ===

/// Edge reported by [`ActiveCheck::record`] when the up/down state flips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// `rise` consecutive successes brought a down backend up.
    WentUp,
    /// `fall` consecutive failures took an up backend down.
    WentDown,
}

/// Active check outcome tracking with HAProxy-style rise/fall.
///
/// A down backend comes up after `rise` consecutive passes; an up backend goes down
/// after `fall` consecutive failures. Any opposite result resets the streak, which is
/// what HAProxy's single health counter amounts to (a failure below `rise` drops it to
/// zero, a pass while up refills it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive passes since the last failure.
    ok_streak: u32,
    /// Consecutive failures since the last pass.
    fail_streak: u32,
}

impl ActiveCheck {
    /// New tracker. `rise` and `fall` below 1 are treated as 1 (a zero would mean
    /// "flip without any evidence"). HAProxy defaults are `rise 2 fall 3`.
    pub fn new(rise: u32, fall: u32, initially_up: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up: initially_up,
            ok_streak: 0,
            fail_streak: 0,
        }
    }

    /// Records one check result; returns the transition if the state flipped.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.fail_streak = 0;
            self.ok_streak = self.ok_streak.saturating_add(1);
            if !self.up && self.ok_streak >= self.rise {
                self.up = true;
                return Some(Transition::WentUp);
            }
        } else {
            self.ok_streak = 0;
            self.fail_streak = self.fail_streak.saturating_add(1);
            if self.up && self.fail_streak >= self.fall {
                self.up = false;
                return Some(Transition::WentDown);
            }
        }
        None
    }

    /// Whether the backend currently counts as up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Configured `rise` (after clamping to at least 1).
    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// Configured `fall` (after clamping to at least 1).
    pub fn fall(&self) -> u32 {
        self.fall
    }
}

// === impl Outlier ===

/// Passive outlier detection (Envoy-style): consecutive failures eject for
/// `base * 2^(n-1)` up to a cap, where `n` counts recent ejections.
///
/// Envoy grows the ejection linearly (`base * n`); doubling backs off a persistently
/// bad backend faster. The repeat count `n` resets to 0 once the backend has stayed
/// un-ejected for one `max` span after its last ejection ended (see [`Outlier::tick`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outlier {
    /// End of the current (or last, until `tick` clears it) ejection.
    ejected_until: Option<Instant>,
    /// Ejections since the multiplier last reset; drives the doubling.
    repeat: u32,
    /// When `repeat` resets if no new ejection happens first.
    decay_at: Option<Instant>,
    /// Lifetime count, for stats.
    ejections_total: u64,
}

impl Outlier {
    /// Not ejected, no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the backend is ejected at `now` (the end instant itself is not ejected).
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Called when the workers' consecutive-failure count for this backend reached the
    /// threshold. Returns the ejection end if it ejected. `allowed` = result of
    /// [`may_eject`] (max_ejection_percent governor).
    ///
    /// Does nothing (returns `None`) when: already ejected (like Envoy, an ejected host
    /// is not re-ejected); `allowed` is false; the computed span is zero (`base` or `max`
    /// zero disables ejection); or the end would not fit in an `Instant` (a config error,
    /// refused rather than panicking).
    pub fn eject(&mut self, now: Instant, base: Duration, max: Duration, allowed: bool) -> Option<Instant> {
        if self.is_ejected(now) || !allowed {
            return None;
        }
        // `tick` may not have run since the decay point passed; honour it here so a late
        // tick cannot make this ejection longer than the rules say.
        let repeat = if self.decay_at.is_some_and(|d| now >= d) {
            0
        } else {
            self.repeat
        };
        let repeat = repeat.saturating_add(1);
        let span = ejection_span(base, max, repeat);
        if span.is_zero() {
            return None;
        }
        let until = now.checked_add(span)?;
        self.repeat = repeat;
        self.ejected_until = Some(until);
        // None (overflow) simply means "never decays", which is the safe direction.
        self.decay_at = until.checked_add(max);
        self.ejections_total += 1;
        Some(until)
    }

    /// Returns true when an ejection just ended at `now` (caller rebuilds). Also decays
    /// the repeat multiplier: after one `max` span (the `max` passed to the last
    /// [`eject`](Self::eject)) without a new ejection, counted from the end of the last
    /// ejection, the multiplier resets and the next ejection lasts `base` again.
    ///
    /// Reports each ended ejection once, however late `tick` runs.
    pub fn tick(&mut self, now: Instant) -> bool {
        let mut ended = false;
        if let Some(until) = self.ejected_until {
            if now >= until {
                self.ejected_until = None;
                ended = true;
            }
        }
        if self.ejected_until.is_none() && self.decay_at.is_some_and(|d| now >= d) {
            self.repeat = 0;
            self.decay_at = None;
        }
        ended
    }

    /// Ejections over the lifetime of this backend.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total
    }

    /// Ejections since the multiplier last reset (the `n` in `base * 2^(n-1)`).
    pub fn repeat_count(&self) -> u32 {
        self.repeat
    }

    /// End of the current ejection, if one is in force or not yet reported by `tick`.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }
}

/// `min(base * 2^(repeat-1), max)` without overflow.
fn ejection_span(base: Duration, max: Duration, repeat: u32) -> Duration {
    // 2^31 already exceeds any sane cap; clamping the shift keeps the factor a u32.
    let factor = 1u32 << repeat.saturating_sub(1).min(31);
    base.checked_mul(factor).unwrap_or(Duration::MAX).min(max)
}

// === max_ejection_percent ===

/// max_ejection_percent governor: may one more backend be ejected?
///
/// `max_ejection_percent` is a percentage (0..=100; Envoy's default is 10). The limit is
/// `floor(total * pct / 100)` ejected backends, counting the new one, but at least one,
/// so small pools are not exempt from outlier detection (Envoy also always allows one).
/// Two exceptions: `pct <= 0` (or NaN) disables ejection, and the last non-ejected
/// backend is never ejected, since ejection only helps by moving load to others.
/// Examples at 50%: 2 backends -> 1, 3 -> 1, 10 -> 5; at 10%: 2, 3 or 10 -> 1;
/// 1 backend -> 0 at any percentage.
pub fn may_eject(ejected_now: usize, total: usize, max_ejection_percent: f64) -> bool {
    if max_ejection_percent.is_nan() || max_ejection_percent <= 0.0 {
        return false;
    }
    let pct = max_ejection_percent.min(100.0);
    // The epsilon absorbs float error such as 10 * 30% = 2.9999999999999996.
    let limit = ((total as f64) * pct / 100.0 + 1e-9).floor() as usize;
    let after = ejected_now.saturating_add(1);
    after <= limit.max(1) && after < total
}

// === slow start ===

/// Slow start: fraction of full weight, in permille, for a backend up since `since`,
/// ramping over `window` in `steps` equal steps (e.g. 10), plus when it next changes.
///
/// The weight is the linear ramp `elapsed / window` rounded down to a multiple of
/// `1000 / steps` permille, but never below one step (a backend at 0 would take no
/// traffic and prove nothing): with 10 steps, 100‰ for the first two tenths of the
/// window, then 200‰, … 900‰, and exactly 1000‰ from `since + window` on, where
/// `next_step_at` becomes `None`. `next_step_at` is the first instant with a different
/// weight, so every rebuild the caller makes changes the table.
///
/// Rebuild cost: the caller rebuilds once on coming up and once per step change, i.e.
/// `steps` Maglev builds per recovering backend per window. `steps` is clamped to
/// 1..=1000 (permille resolution); `steps == 1` or a zero window means no slow start.
/// `now` before `since` counts as zero elapsed.
pub fn slow_start(since: Instant, now: Instant, window: Duration, steps: u32) -> (u32, Option<Instant>) {
    let steps = steps.clamp(1, PERMILLE_FULL);
    let window_ns = window.as_nanos();
    if window_ns == 0 {
        return (PERMILLE_FULL, None);
    }
    let elapsed_ns = now.saturating_duration_since(since).as_nanos();
    let reached = (elapsed_ns.saturating_mul(u128::from(steps)) / window_ns).min(u128::from(steps));
    // `reached` <= steps <= 1000, so the cast is lossless.
    let level = (reached as u32).max(1);
    if level >= steps {
        return (PERMILLE_FULL, None);
    }
    let permille = PERMILLE_FULL * level / steps;
    // First instant at which floor(elapsed * steps / window) >= level + 1: rounding up
    // guarantees the weight has really changed when the caller wakes.
    let next = u128::from(level + 1);
    let boundary_ns = (window_ns * next).div_ceil(u128::from(steps));
    let next_at = since.checked_add(duration_from_nanos(boundary_ns));
    (permille, next_at)
}

/// `Duration` from a u128 nanosecond count (`Duration::from_nanos` takes only u64).
fn duration_from_nanos(ns: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(ns / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // Remainder < 1e9 always fits in u32.
    Duration::new(secs, (ns % NANOS_PER_SEC) as u32)
}

// === pool planning ===

/// One backend's inputs to [`plan_pool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendView {
    /// Configured weight (0 = never picked).
    pub weight: u32,
    /// Operator intent.
    pub admin: AdminState,
    /// Active check up and not ejected by outlier detection.
    pub healthy: bool,
    /// Slow-start fraction from [`slow_start`]; 1000 = full, larger values count as 1000.
    pub slow_start_permille: u32,
}

/// Result of [`plan_pool`]: what the control plane feeds the Maglev builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    /// Effective Maglev weight per backend, same order as the input; 0 = not in the
    /// table. Scaled by [`WEIGHT_SCALE`].
    pub weights: Vec<u32>,
    /// Panic mode engaged: health was ignored for Enabled backends.
    pub panic: bool,
    /// Backends with a non-zero weight; 0 means the caller must fail fast.
    pub usable: usize,
}

/// Effective weights for a pool. Rules:
/// - Disabled and Draining backends never get new connections (weight 0), in any mode.
/// - healthy share = Σ weight of healthy Enabled / Σ weight of Enabled. If it is strictly
///   below `panic_threshold` (0.0..=1.0, default 0.5; 0 or NaN disables panic), panic:
///   every Enabled backend gets its full weight, ignoring health and slow start (like
///   Envoy/HAProxy: better to spread over all than pile on the survivors). Exactly 50%
///   healthy at threshold 0.5 does not panic (Envoy also compares with `<`).
/// - otherwise healthy Enabled backends get `weight * slow_start_permille` (that is,
///   `weight * WEIGHT_SCALE` at full strength; min 1 if weight > 0), unhealthy ones 0.
/// - no usable backend -> all zero (caller fails fast).
///
/// Scaled weights saturate at `u32::MAX`; configured weights up to 4_294_967 keep exact
/// ratios (config validation should cap far lower, HAProxy's limit is 256).
pub fn plan_pool(backends: &[BackendView], panic_threshold: f64) -> PoolPlan {
    let enabled = |b: &&BackendView| b.admin == AdminState::Enabled;
    // u64 sums cannot overflow for any realistic pool size (< 2^32 backends).
    let enabled_weight: u64 = backends.iter().filter(enabled).map(|b| u64::from(b.weight)).sum();
    let healthy_weight: u64 = backends
        .iter()
        .filter(enabled)
        .filter(|b| b.healthy)
        .map(|b| u64::from(b.weight))
        .sum();

    let threshold = if panic_threshold.is_nan() {
        0.0
    } else {
        panic_threshold.clamp(0.0, 1.0)
    };
    // Compared as healthy < threshold * total, so an empty pool (0 < 0) never panics.
    let panic = (healthy_weight as f64) < threshold * enabled_weight as f64;

    let weights: Vec<u32> = backends
        .iter()
        .map(|b| {
            if b.admin != AdminState::Enabled || b.weight == 0 {
                0
            } else if panic {
                b.weight.saturating_mul(WEIGHT_SCALE)
            } else if b.healthy {
                let permille = b.slow_start_permille.min(PERMILLE_FULL);
                b.weight.saturating_mul(permille).max(1)
            } else {
                0
            }
        })
        .collect();
    let usable = weights.iter().filter(|&&w| w > 0).count();
    PoolPlan { weights, panic, usable }
}

/// Result of [`plan_tiers`]: the plan of the tier that serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPlan {
    /// The plan; backends of the other tier have weight 0.
    pub plan: PoolPlan,
    /// Whether the backups serve (no primary is healthy).
    pub backup_tier: bool,
}

/// [`plan_pool`] for a pool with backup backends (`backup[i]`):
/// 1. while some primary is healthy, the primaries' plan, its panic
///    threshold over the primaries only (backups get 0);
/// 2. with no primary healthy, the backups' own plan if one of them is
///    healthy (primaries get 0);
/// 3. with nothing healthy at all, the primaries' plan again (panic over
///    the enabled primaries, or all zero: fail fast).
///
/// A pool without backups gets exactly [`plan_pool`].
pub fn plan_tiers(backends: &[BackendView], backup: &[bool], panic_threshold: f64) -> TierPlan {
    debug_assert_eq!(backends.len(), backup.len());
    if !backup.iter().any(|&b| b) {
        return TierPlan {
            plan: plan_pool(backends, panic_threshold),
            backup_tier: false,
        };
    }
    // Each tier planned alone: the other tier's backends are made weight 0
    // so they neither count towards its panic threshold nor get slots.
    let tier = |want_backup: bool| -> (PoolPlan, bool) {
        let views: Vec<BackendView> = backends
            .iter()
            .zip(backup)
            .map(|(v, &b)| {
                if b == want_backup {
                    *v
                } else {
                    BackendView { weight: 0, ..*v }
                }
            })
            .collect();
        let healthy = views
            .iter()
            .any(|v| v.weight > 0 && v.healthy && v.admin == AdminState::Enabled);
        (plan_pool(&views, panic_threshold), healthy)
    };
    let (primary, primary_healthy) = tier(false);
    if primary_healthy {
        return TierPlan {
            plan: primary,
            backup_tier: false,
        };
    }
    let (backups, backup_healthy) = tier(true);
    if backup_healthy {
        return TierPlan {
            plan: backups,
            backup_tier: true,
        };
    }
    TierPlan {
        plan: primary,
        backup_tier: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    // === ActiveCheck ===

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut c = ActiveCheck::new(2, 3, true);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert!(c.is_up());
        assert_eq!(c.record(false), Some(Transition::WentDown));
        assert!(!c.is_up());
        // Further failures do not report again.
        assert_eq!(c.record(false), None);
    }

    #[test]
    fn interleaved_results_reset_streaks() {
        let mut c = ActiveCheck::new(2, 3, true);
        for _ in 0..10 {
            assert_eq!(c.record(false), None);
            assert_eq!(c.record(false), None);
            assert_eq!(c.record(true), None);
        }
        assert!(c.is_up());
        // Now down, then pass/fail alternation never reaches rise = 2.
        for _ in 0..3 {
            c.record(false);
        }
        assert!(!c.is_up());
        for _ in 0..10 {
            assert_eq!(c.record(true), None);
            assert_eq!(c.record(false), None);
        }
        assert!(!c.is_up());
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::WentUp));
    }

    #[test]
    fn initially_down_needs_rise_passes() {
        let mut c = ActiveCheck::new(3, 2, false);
        assert!(!c.is_up());
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::WentUp));
        assert!(c.is_up());
        assert_eq!(c.record(true), None);
    }

    #[test]
    fn zero_rise_fall_clamped_to_one() {
        let mut c = ActiveCheck::new(0, 0, false);
        assert_eq!((c.rise(), c.fall()), (1, 1));
        assert_eq!(c.record(true), Some(Transition::WentUp));
        assert_eq!(c.record(false), Some(Transition::WentDown));
    }

    // === Outlier ===

    #[test]
    fn ejection_doubles_and_caps() {
        let t0 = Instant::now();
        let (base, max) = (secs(30), secs(300));
        let mut o = Outlier::new();
        let mut now = t0;
        let mut spans = Vec::new();
        for _ in 0..6 {
            let until = o.eject(now, base, max, true).expect("ejects");
            spans.push(until - now);
            assert!(o.is_ejected(now));
            assert!(o.is_ejected(until - Duration::from_nanos(1)));
            assert!(!o.is_ejected(until));
            assert!(o.tick(until));
            // Re-eject right away: no decay in between.
            now = until;
        }
        assert_eq!(spans, [30, 60, 120, 240, 300, 300].map(secs));
        assert_eq!(o.ejections_total(), 6);
    }

    #[test]
    fn already_ejected_or_not_allowed_does_nothing() {
        let t0 = Instant::now();
        let mut o = Outlier::new();
        assert_eq!(o.eject(t0, secs(30), secs(300), false), None);
        assert_eq!(o.ejections_total(), 0);
        let until = o.eject(t0, secs(30), secs(300), true).unwrap();
        assert_eq!(o.eject(t0 + secs(10), secs(30), secs(300), true), None);
        assert_eq!(o.ejected_until(), Some(until));
        assert_eq!(o.ejections_total(), 1);
        assert_eq!(o.eject(t0, Duration::ZERO, secs(300), true), None);
    }

    #[test]
    fn tick_ends_ejection_once() {
        let t0 = Instant::now();
        let mut o = Outlier::new();
        let until = o.eject(t0, secs(30), secs(300), true).unwrap();
        assert!(!o.tick(t0 + secs(29)));
        assert!(o.is_ejected(t0 + secs(29)));
        // A late tick still reports the end, exactly once.
        assert!(o.tick(until + secs(5)));
        assert!(!o.tick(until + secs(6)));
        assert!(!o.is_ejected(until + secs(6)));
        assert_eq!(o.ejected_until(), None);
    }

    #[test]
    fn multiplier_decays_after_max_span() {
        let t0 = Instant::now();
        let (base, max) = (secs(30), secs(300));
        let mut o = Outlier::new();
        let u1 = o.eject(t0, base, max, true).unwrap();
        assert!(o.tick(u1));
        // Inside the decay span: next ejection doubles.
        let now = u1 + max - secs(1);
        o.tick(now);
        let u2 = o.eject(now, base, max, true).unwrap();
        assert_eq!(u2 - now, secs(60));
        assert_eq!(o.repeat_count(), 2);
        assert!(o.tick(u2));
        // One full max span after the end: reset, back to base.
        assert!(!o.tick(u2 + max));
        assert_eq!(o.repeat_count(), 0);
        let now = u2 + max + secs(1);
        let u3 = o.eject(now, base, max, true).unwrap();
        assert_eq!(u3 - now, base);
    }

    #[test]
    fn decay_applies_even_without_tick() {
        let t0 = Instant::now();
        let (base, max) = (secs(30), secs(300));
        let mut o = Outlier::new();
        let u1 = o.eject(t0, base, max, true).unwrap();
        let now = u1 + max;
        let u2 = o.eject(now, base, max, true).unwrap();
        assert_eq!(u2 - now, base);
    }

    // === may_eject ===

    #[test]
    fn may_eject_table() {
        // (total, pct, how many may be ejected in sequence)
        let cases = [
            (1, 50.0, 0),
            (1, 10.0, 0),
            (2, 50.0, 1),
            (2, 10.0, 1),
            (3, 50.0, 1),
            (3, 10.0, 1),
            (10, 50.0, 5),
            (10, 10.0, 1),
            (10, 30.0, 3),
            (10, 100.0, 9),
            (10, 0.0, 0),
            (10, f64::NAN, 0),
        ];
        for (total, pct, expect) in cases {
            let allowed = (0..total).take_while(|&n| may_eject(n, total, pct)).count();
            assert_eq!(allowed, expect, "total {total} pct {pct}");
        }
        assert!(!may_eject(0, 0, 50.0));
    }

    // === slow_start ===

    #[test]
    fn slow_start_steps() {
        let t0 = Instant::now();
        let w = secs(100);
        let mut last = 0;
        let mut seen = Vec::new();
        for s in 0..=100 {
            let (p, next) = slow_start(t0, t0 + secs(s), w, 10);
            assert!(p >= last, "monotonic");
            assert!(p >= 100, "never below one step");
            if s < 100 {
                let next = next.expect("still ramping");
                assert!(next > t0 + secs(s));
                // The weight really changes at next_step_at, and not just before.
                assert!(slow_start(t0, next, w, 10).0 > p);
                assert_eq!(slow_start(t0, next - Duration::from_nanos(1), w, 10).0, p);
            }
            if seen.last() != Some(&p) {
                seen.push(p);
            }
            last = p;
        }
        assert_eq!(seen, [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
        assert_eq!(slow_start(t0, t0 + secs(99), w, 10).0, 900);
        assert_eq!(slow_start(t0, t0 + w, w, 10), (1000, None));
        assert_eq!(slow_start(t0, t0 + secs(1000), w, 10), (1000, None));
        // First step lasts two tenths: no rebuild that changes nothing.
        assert_eq!(slow_start(t0, t0, w, 10), (100, Some(t0 + secs(20))));
    }

    #[test]
    fn slow_start_edges() {
        let t0 = Instant::now() + secs(10);
        assert_eq!(slow_start(t0, t0, Duration::ZERO, 10), (1000, None));
        assert_eq!(slow_start(t0, t0, secs(60), 1), (1000, None));
        // Clock before `since` counts as just started.
        assert_eq!(slow_start(t0, t0 - secs(5), secs(60), 3).0, 333);
        // Uneven split: boundaries rounded up so the weight has changed at wake-up.
        let w = Duration::from_nanos(10);
        let (p, next) = slow_start(t0, t0, w, 3);
        assert_eq!((p, next), (333, Some(t0 + Duration::from_nanos(7))));
    }

    // === plan_pool ===

    fn view(weight: u32, admin: AdminState, healthy: bool) -> BackendView {
        BackendView {
            weight,
            admin,
            healthy,
            slow_start_permille: PERMILLE_FULL,
        }
    }

    use AdminState::{Disabled, Draining, Enabled};

    #[test]
    fn plan_normal_scales_weights() {
        let mut b = vec![view(1, Enabled, true), view(3, Enabled, true), view(2, Enabled, false)];
        b[0].slow_start_permille = 100;
        let p = plan_pool(&b, DEFAULT_PANIC_THRESHOLD);
        assert_eq!(p.weights, [100, 3000, 0]);
        assert!(!p.panic);
        assert_eq!(p.usable, 2);
        // Slow start at 0‰ still leaves one unit, so the backend gets probed by traffic.
        b[0].slow_start_permille = 0;
        assert_eq!(plan_pool(&b, 0.5).weights[0], 1);
    }

    #[test]
    fn plan_excludes_draining_and_disabled() {
        let b = [view(1, Enabled, true), view(5, Draining, true), view(5, Disabled, true)];
        let p = plan_pool(&b, 0.5);
        assert_eq!(p.weights, [1000, 0, 0]);
        assert_eq!(p.usable, 1);
        // Draining/Disabled do not count toward the healthy share either.
        assert!(!p.panic);
    }

    #[test]
    fn panic_below_threshold_not_at_it() {
        // 1 of 3 equal-weight healthy: 33% < 50% -> panic, all enabled at full weight.
        let mut b = vec![view(1, Enabled, true), view(1, Enabled, false), view(1, Enabled, false)];
        b[0].slow_start_permille = 500;
        let p = plan_pool(&b, 0.5);
        assert!(p.panic);
        assert_eq!(p.weights, [1000, 1000, 1000]);
        assert_eq!(p.usable, 3);
        // Exactly 50% healthy (by weight) does not panic.
        let b = [view(2, Enabled, true), view(1, Enabled, false), view(1, Enabled, false)];
        let p = plan_pool(&b, 0.5);
        assert!(!p.panic);
        assert_eq!(p.weights, [2000, 0, 0]);
    }

    #[test]
    fn panic_all_unhealthy_spreads_over_enabled() {
        let b = [
            view(1, Enabled, false),
            view(2, Enabled, false),
            view(4, Draining, false),
        ];
        let p = plan_pool(&b, 0.5);
        assert!(p.panic);
        assert_eq!(p.weights, [1000, 2000, 0]);
        assert_eq!(p.usable, 2);
    }

    #[test]
    fn zero_threshold_never_panics() {
        let b = [view(1, Enabled, false), view(1, Enabled, false)];
        let p = plan_pool(&b, 0.0);
        assert!(!p.panic);
        assert_eq!(p.weights, [0, 0]);
        assert_eq!(p.usable, 0);
        assert!(!plan_pool(&b, f64::NAN).panic);
    }

    #[test]
    fn all_disabled_is_all_zero() {
        let b = [view(1, Disabled, true), view(2, Draining, true), view(0, Enabled, true)];
        let p = plan_pool(&b, 0.5);
        assert_eq!(
            p,
            PoolPlan {
                weights: vec![0, 0, 0],
                panic: false,
                usable: 0
            }
        );
        assert_eq!(plan_pool(&[], 0.5).usable, 0);
    }

    fn arb_view() -> impl Strategy<Value = BackendView> {
        (0u32..100, 0u8..3, any::<bool>(), 0u32..=1200).prop_map(|(weight, a, healthy, p)| {
            let admin = [Enabled, Draining, Disabled][a as usize];
            BackendView {
                weight,
                admin,
                healthy,
                slow_start_permille: p,
            }
        })
    }

    proptest! {
        #[test]
        fn plan_respects_admin_and_health(
            b in proptest::collection::vec(arb_view(), 0..20),
            threshold in 0.0f64..=1.0,
        ) {
            let p = plan_pool(&b, threshold);
            prop_assert_eq!(p.weights.len(), b.len());
            prop_assert_eq!(p.usable, p.weights.iter().filter(|&&w| w > 0).count());
            for (v, &w) in b.iter().zip(&p.weights) {
                if v.admin != Enabled || v.weight == 0 {
                    prop_assert_eq!(w, 0);
                } else if p.panic {
                    prop_assert_eq!(w, v.weight * WEIGHT_SCALE);
                } else if v.healthy {
                    prop_assert!(w >= 1 && w <= v.weight * WEIGHT_SCALE);
                } else {
                    prop_assert_eq!(w, 0);
                }
            }
        }

        #[test]
        fn slow_start_monotonic(
            steps in 0u32..50, window_ms in 0u64..100_000, a in 0u64..200_000, d in 0u64..200_000,
        ) {
            let t0 = Instant::now();
            let w = Duration::from_millis(window_ms);
            let (p1, n1) = slow_start(t0, t0 + Duration::from_millis(a), w, steps);
            let (p2, _) = slow_start(t0, t0 + Duration::from_millis(a + d), w, steps);
            prop_assert!(p1 <= p2 && p2 <= PERMILLE_FULL && p1 > 0);
            prop_assert_eq!(n1.is_none(), p1 == PERMILLE_FULL);
            if let Some(n) = n1 {
                prop_assert!(slow_start(t0, n, w, steps).0 > p1);
            }
        }
    }
}

#[cfg(test)]
mod compose_tests {
    use super::*;

    #[test]
    fn a_share_is_scaled_by_the_health_fraction_and_never_rounded_out() {
        // Weight 2 at full strength (plan 2000): the share is kept.
        assert_eq!(apply_plan_to_share(500_000, 2 * WEIGHT_SCALE, 2), 500_000);
        // At 10% slow start: a tenth.
        assert_eq!(apply_plan_to_share(500_000, 200, 2), 50_000);
        // Down, or weight 0: nothing.
        assert_eq!(apply_plan_to_share(500_000, 0, 2), 0);
        assert_eq!(apply_plan_to_share(500_000, 100, 0), 0);
        // A tiny share at a tiny fraction still gets 1.
        assert_eq!(apply_plan_to_share(3, 1, 1000), 1);
        assert_eq!(apply_plan_to_share(0, 1000, 1), 0);
    }
}
