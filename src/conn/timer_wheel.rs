//! A hashed timer wheel: connection deadlines with O(1) insert and a
//! bounded, allocation-free (once warm) advance, read against one clock
//! sample per loop turn.
//!
//! Entries are never removed: a shell arms a deadline once, and when it
//! fires asks the connection whether it really is due (activity moves an
//! idle deadline later without touching the wheel). So a busy connection
//! costs one insert per idle period, not one per byte moved.

use std::time::{Duration, Instant};

/// Granularity of the wheel: a deadline fires up to this much late.
pub const TICK: Duration = Duration::from_millis(5);
/// Slots: the wheel turns once every `SLOTS * TICK` (about 10 s); a later
/// deadline waits in its slot for as many turns as it needs.
const SLOTS: usize = 2048;

/// Deadlines keyed by a caller's `u64` (a connection id and generation).
pub struct TimerWheel {
    origin: Instant,
    /// Ticks up to which everything due has fired.
    done: u64,
    slots: Vec<Vec<(u64, u64)>>,
    len: usize,
}

impl TimerWheel {
    /// An empty wheel whose tick 0 is `origin`.
    pub fn new(origin: Instant) -> TimerWheel {
        TimerWheel {
            origin,
            done: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    fn tick_of(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.origin);
        (since.as_nanos() / TICK.as_nanos()) as u64
    }

    /// Entries armed and not yet fired.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms `key` to fire at `deadline` (rounded up to the next tick, so
    /// it never fires early). A deadline already past fires on the next
    /// advance.
    pub fn insert(&mut self, key: u64, deadline: Instant) {
        let tick = (self.tick_of(deadline) + 1).max(self.done + 1);
        self.slots[(tick % SLOTS as u64) as usize].push((tick, key));
        self.len += 1;
    }

    /// Moves the wheel to `now`, pushing every key whose deadline has come
    /// to `fired`.
    pub fn advance(&mut self, now: Instant, fired: &mut Vec<u64>) {
        let target = self.tick_of(now);
        if target <= self.done || self.len == 0 {
            self.done = self.done.max(target);
            return;
        }
        // Past one whole turn every slot is visited once.
        let steps = (target - self.done).min(SLOTS as u64);
        for step in 1..=steps {
            let index = ((self.done + step) % SLOTS as u64) as usize;
            let slot = &mut self.slots[index];
            let before = slot.len();
            slot.retain(|&(tick, key)| {
                if tick <= target {
                    fired.push(key);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        self.done = target;
    }

    /// When the next entry may be due (a slot's time: an entry waiting for
    /// a later turn makes this early, never late), or `None` when empty.
    pub fn next_due(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        for step in 1..=SLOTS as u64 {
            let tick = self.done + step;
            if !self.slots[(tick % SLOTS as u64) as usize].is_empty() {
                // Its entries are due at this tick or on a later turn: at
                // worst the caller wakes once a turn for nothing.
                return Some(self.origin + TICK * tick as u32);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_or_after_the_deadline_never_before() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        w.insert(1, t0 + Duration::from_millis(100));
        w.insert(2, t0 + Duration::from_millis(30));
        let mut fired = Vec::new();
        w.advance(t0 + Duration::from_millis(29), &mut fired);
        assert!(fired.is_empty());
        w.advance(t0 + Duration::from_millis(40), &mut fired);
        assert_eq!(fired, vec![2]);
        w.advance(t0 + Duration::from_millis(99), &mut fired);
        assert_eq!(fired, vec![2]);
        w.advance(t0 + Duration::from_millis(106), &mut fired);
        assert_eq!(fired, vec![2, 1]);
        assert!(w.is_empty());
    }

    #[test]
    fn deadlines_beyond_one_turn_wait_for_their_turn() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let far = t0 + TICK * (SLOTS as u32 * 3 + 7);
        w.insert(9, far);
        let mut fired = Vec::new();
        let mut now = t0;
        while now + Duration::from_secs(1) < far {
            now += Duration::from_secs(1);
            w.advance(now, &mut fired);
            assert!(fired.is_empty(), "fired early at {:?}", now - t0);
        }
        w.advance(far + TICK, &mut fired);
        assert_eq!(fired, vec![9]);
    }

    #[test]
    fn a_past_deadline_fires_on_the_next_advance() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let mut fired = Vec::new();
        w.advance(t0 + Duration::from_secs(1), &mut fired);
        w.insert(3, t0);
        w.advance(t0 + Duration::from_secs(1) + TICK, &mut fired);
        assert_eq!(fired, vec![3]);
    }

    #[test]
    fn next_due_is_never_later_than_the_earliest_deadline() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        assert_eq!(w.next_due(), None);
        let d = t0 + Duration::from_millis(250);
        w.insert(1, t0 + Duration::from_secs(60));
        w.insert(2, d);
        let due = w.next_due().unwrap();
        assert!(due >= d && due <= d + TICK * 2, "{:?}", due - t0);
    }

    proptest::proptest! {
        #[test]
        fn every_key_fires_once_and_not_early(deadlines in proptest::collection::vec(0u64..30_000, 1..50)) {
            let t0 = Instant::now();
            let mut w = TimerWheel::new(t0);
            for (k, ms) in deadlines.iter().enumerate() {
                w.insert(k as u64, t0 + Duration::from_millis(*ms));
            }
            let mut fired = Vec::new();
            let mut seen = vec![false; deadlines.len()];
            let mut now = t0;
            while !w.is_empty() {
                now += Duration::from_millis(7);
                w.advance(now, &mut fired);
                for k in fired.drain(..) {
                    let k = k as usize;
                    proptest::prop_assert!(!seen[k]);
                    seen[k] = true;
                    proptest::prop_assert!(t0 + Duration::from_millis(deadlines[k]) <= now);
                    proptest::prop_assert!(now <= t0 + Duration::from_millis(deadlines[k]) + TICK * 2 + Duration::from_millis(7));
                }
            }
            proptest::prop_assert!(seen.iter().all(|&s| s));
        }
    }
}
