//! Bounded per-worker UDP flow table with idle expiry on a lazily refreshed timer wheel.
//!
//! Time is the caller's: every time-dependent method takes `now: Instant`, so the
//! table is pure and deterministic.
//!
//! # Expiry precision
//!
//! The wheel ticks every `idle_timeout / 64` (at least 1 ms), see
//! [`FlowTable::tick`]. A flow idle for less than `idle_timeout` is never expired; a
//! flow idle for `idle_timeout + tick` or more is always expired by an
//! [`FlowTable::expire`] call at that time. In between, it depends on tick phase.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::mem;
use std::time::{Duration, Instant};

/// Ticks per idle timeout: expiry is late by at most 1/64 of the timeout.
const TICKS_PER_TIMEOUT: u64 = 64;
/// Wheel slots. A deadline is at most `TICKS_PER_TIMEOUT + 1` ticks ahead, so while the
/// caller keeps up with `expire` no flow wraps a rotation; 128 slots fit one `u128`.
const SLOTS: u64 = 128;
/// Floor on the tick so that a tiny timeout does not turn into a busy wakeup loop.
const MIN_TICK_NS: u64 = 1_000_000;
/// Clamp on timeouts and uptimes (~146 years) so nanosecond sums cannot overflow.
const MAX_NS: u64 = u64::MAX / 4;
/// Null link in the intrusive lists.
const NIL: u32 = u32::MAX;

/// Returned by [`FlowTable::insert`] when the table is full; hands the value back.
pub struct Full<V>(pub V);

// === impl Full ===

impl<V> fmt::Debug for Full<V> {
    // Written by hand so that `V` need not be `Debug` (it may be a socket handle).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Full(..)")
    }
}

impl<V> fmt::Display for Full<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UDP flow table is full")
    }
}

impl<V> std::error::Error for Full<V> {}

/// One flow, linked into the wheel slot where its expiry will next be checked.
struct Node<K, V> {
    key: K,
    value: V,
    /// Nanoseconds since the table's origin; moves forward only.
    last_seen: u64,
    prev: u32,
    next: u32,
    slot: u8,
}

/// Slab entry; vacant entries form a free list so removal never shifts others.
enum Entry<K, V> {
    Occupied(Node<K, V>),
    Vacant { next_free: u32 },
}

/// Bounded map of live UDP flows with O(1) refresh and amortised O(1) idle expiry.
///
/// Owned by one worker thread; nothing is shared or locked. Storage grows with the
/// number of live flows up to `capacity` and is kept for reuse (never shrinks).
///
/// Refreshing a flow ([`get`](Self::get), [`touch`](Self::touch)) only records the
/// time. The wheel is corrected lazily: when a flow's slot comes due and its real
/// deadline has moved, it is re-filed under the new deadline. A flow that stays busy
/// therefore costs one re-file per idle timeout, not one wheel move per datagram.
pub struct FlowTable<K, V> {
    index: HashMap<K, u32>,
    slab: Vec<Entry<K, V>>,
    free: u32,
    heads: [u32; SLOTS as usize],
    /// Bit `s` set iff slot `s` is non-empty: finds due slots without walking empties.
    nonempty: u128,
    origin: Instant,
    timeout_ns: u64,
    tick_ns: u64,
    /// First tick that `expire` has not processed yet.
    next_tick: u64,
    capacity: usize,
    /// Ticks walked by `expire`, to prove the walk is bounded after a long pause.
    #[cfg(test)]
    ticks_walked: u64,
}

// === impl FlowTable ===

impl<K: Copy + Eq + Hash, V> FlowTable<K, V> {
    /// Creates an empty table holding at most `capacity` flows (capped at
    /// `u32::MAX - 1`), expiring flows idle for `idle_timeout`.
    ///
    /// Allocates only the fixed 128-slot wheel; flow storage grows on demand.
    /// `now` is the table's time origin; earlier instants are treated as `now`.
    pub fn new(capacity: usize, idle_timeout: Duration, now: Instant) -> Self {
        let timeout_ns = u64::try_from(idle_timeout.as_nanos()).map_or(MAX_NS, |t| t.min(MAX_NS));
        Self {
            index: HashMap::new(),
            slab: Vec::new(),
            free: NIL,
            heads: [NIL; SLOTS as usize],
            nonempty: 0,
            origin: now,
            timeout_ns,
            tick_ns: (timeout_ns / TICKS_PER_TIMEOUT).max(MIN_TICK_NS),
            next_tick: 0,
            // Slab indices are u32 with NIL reserved.
            capacity: capacity.min(NIL as usize),
            #[cfg(test)]
            ticks_walked: 0,
        }
    }

    /// Maximum number of flows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of live flows.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the table holds no flows.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The idle timeout (clamped to about 146 years).
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns)
    }

    /// Expiry granularity: `idle_timeout / 64`, at least 1 ms. Flows expire between
    /// `idle_timeout` and `idle_timeout + tick` of idleness.
    pub fn tick(&self) -> Duration {
        Duration::from_nanos(self.tick_ns)
    }

    /// Whether `key` has a live flow, without refreshing it.
    pub fn contains_key(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    /// The flow's state, refreshing its idle deadline (a datagram from the client).
    pub fn get(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        let idx = *self.index.get(key)?;
        let now_ns = self.ns(now);
        let node = self.node_mut(idx);
        node.last_seen = node.last_seen.max(now_ns);
        Some(&mut node.value)
    }

    /// Refreshes the flow's idle deadline without access (a reply from the backend).
    /// Returns whether the flow exists.
    pub fn touch(&mut self, key: &K, now: Instant) -> bool {
        self.get(key, now).is_some()
    }

    /// Adds a flow, or replaces the value of an existing one (dropping the old value
    /// and refreshing the deadline; replacing never needs room).
    ///
    /// A new key is refused with [`Full`] when `len() == capacity()`: live flows are
    /// never evicted to make room, the caller drops (and counts) the datagram.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Result<&mut V, Full<V>> {
        let now_ns = self.ns(now);
        if let Some(&idx) = self.index.get(&key) {
            let node = self.node_mut(idx);
            node.value = value;
            node.last_seen = node.last_seen.max(now_ns);
            return Ok(&mut node.value);
        }
        if self.index.len() >= self.capacity {
            return Err(Full(value));
        }
        let node = Node {
            key,
            value,
            last_seen: now_ns,
            prev: NIL,
            next: NIL,
            slot: 0,
        };
        let idx = self.alloc(node);
        self.index.insert(key, idx);
        let due = self.due_tick(now_ns);
        self.link(idx, due);
        Ok(&mut self.node_mut(idx).value)
    }

    /// Removes a flow, returning its state.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let idx = self.index.remove(key)?;
        self.unlink(idx);
        Some(self.release(idx).value)
    }

    /// Moves every flow idle for at least `idle_timeout` at `now` into `out` (within
    /// one tick: see [`tick`](Self::tick)).
    ///
    /// Visits only the slots that came due and the flows filed in them; after a long
    /// pause the walk is capped at one rotation (128 slots), since every flow is filed
    /// in one of them.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(K, V)>) {
        let now_ns = self.ns(now);
        let now_tick = now_ns / self.tick_ns;
        if now_tick < self.next_tick {
            return;
        }
        let first = self.next_tick.max(now_tick.saturating_sub(SLOTS - 1));
        // Re-filed flows have deadlines after `now`, hence ticks after `now_tick`.
        self.next_tick = now_tick + 1;
        for tick in first..=now_tick {
            #[cfg(test)]
            {
                self.ticks_walked += 1;
            }
            let slot = (tick % SLOTS) as usize;
            if self.nonempty & (1 << slot) == 0 {
                continue;
            }
            // Detach the whole list so re-filing into this same slot cannot loop.
            let mut idx = mem::replace(&mut self.heads[slot], NIL);
            self.nonempty &= !(1 << slot);
            while idx != NIL {
                let timeout_ns = self.timeout_ns;
                let node = self.node_mut(idx);
                let next = node.next;
                let deadline = node.last_seen + timeout_ns;
                if deadline <= now_ns {
                    let node = self.release(idx);
                    self.index.remove(&node.key);
                    out.push((node.key, node.value));
                } else {
                    let due = self.due_tick_of_deadline(deadline);
                    self.link(idx, due);
                }
                idx = next;
            }
        }
    }

    /// When [`expire`](Self::expire) should next be called, or `None` if the table
    /// is empty. May be in the past (call now); a call earlier than this does nothing.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.nonempty == 0 {
            return None;
        }
        let start = (self.next_tick % SLOTS) as u32;
        let ahead = u64::from(self.nonempty.rotate_right(start).trailing_zeros());
        let at_ns = (self.next_tick + ahead).saturating_mul(self.tick_ns);
        self.origin.checked_add(Duration::from_nanos(at_ns))
    }

    /// Keeps only the flows for which `keep` returns true, dropping the others
    /// (e.g. the flows of a removed backend, so their next datagram re-picks).
    ///
    /// O(flows stored so far): for control-plane sweeps, not the per-packet path.
    /// Does not refresh deadlines.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for idx in 0..self.slab.len() {
            let keep_it = match &mut self.slab[idx] {
                Entry::Occupied(node) => keep(&node.key, &mut node.value),
                Entry::Vacant { .. } => continue,
            };
            if !keep_it {
                // In range: slab length is at most `capacity <= u32::MAX - 1`.
                let idx = idx as u32;
                self.unlink(idx);
                let node = self.release(idx);
                self.index.remove(&node.key);
            }
        }
    }

    /// Nanoseconds since the origin, clamped so that adding a timeout cannot overflow.
    fn ns(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since).map_or(MAX_NS, |ns| ns.min(MAX_NS))
    }

    /// Tick whose slot should first look at a flow last seen at `last_seen`.
    fn due_tick(&self, last_seen: u64) -> u64 {
        self.due_tick_of_deadline(last_seen + self.timeout_ns)
    }

    /// First tick at or after `deadline`, but never one `expire` already passed
    /// (possible only if the caller's `now` went backwards).
    fn due_tick_of_deadline(&self, deadline: u64) -> u64 {
        deadline.div_ceil(self.tick_ns).max(self.next_tick)
    }

    fn node_mut(&mut self, idx: u32) -> &mut Node<K, V> {
        match &mut self.slab[idx as usize] {
            Entry::Occupied(node) => node,
            Entry::Vacant { .. } => unreachable!("flow index points at a vacant entry"),
        }
    }

    fn alloc(&mut self, node: Node<K, V>) -> u32 {
        if self.free == NIL {
            // Fits: callers check `len < capacity <= u32::MAX - 1` first.
            let idx = self.slab.len() as u32;
            self.slab.push(Entry::Occupied(node));
            return idx;
        }
        let idx = self.free;
        match mem::replace(&mut self.slab[idx as usize], Entry::Occupied(node)) {
            Entry::Vacant { next_free } => self.free = next_free,
            Entry::Occupied(_) => unreachable!("free list points at a live entry"),
        }
        idx
    }

    /// Frees an entry that is no longer linked into the wheel.
    fn release(&mut self, idx: u32) -> Node<K, V> {
        let vacant = Entry::Vacant { next_free: self.free };
        self.free = idx;
        match mem::replace(&mut self.slab[idx as usize], vacant) {
            Entry::Occupied(node) => node,
            Entry::Vacant { .. } => unreachable!("released a vacant entry"),
        }
    }

    /// Pushes the flow onto the front of the slot for `tick`.
    fn link(&mut self, idx: u32, tick: u64) {
        let slot = (tick % SLOTS) as usize;
        let head = self.heads[slot];
        let node = self.node_mut(idx);
        node.prev = NIL;
        node.next = head;
        node.slot = slot as u8;
        if head != NIL {
            self.node_mut(head).prev = idx;
        }
        self.heads[slot] = idx;
        self.nonempty |= 1 << slot;
    }

    fn unlink(&mut self, idx: u32) {
        let node = self.node_mut(idx);
        let (prev, next, slot) = (node.prev, node.next, usize::from(node.slot));
        if prev == NIL {
            self.heads[slot] = next;
            if next == NIL {
                self.nonempty &= !(1 << slot);
            }
        } else {
            self.node_mut(prev).next = next;
        }
        if next != NIL {
            self.node_mut(next).prev = prev;
        }
    }
}

impl<K, V> fmt::Debug for FlowTable<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("len", &self.index.len())
            .field("capacity", &self.capacity)
            .field("idle_timeout", &Duration::from_nanos(self.timeout_ns))
            .field("tick", &Duration::from_nanos(self.tick_ns))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TIMEOUT: Duration = Duration::from_secs(64);
    const TICK: Duration = Duration::from_secs(1);

    fn table(capacity: usize) -> (FlowTable<u32, u32>, Instant) {
        let t0 = Instant::now();
        let t = FlowTable::new(capacity, TIMEOUT, t0);
        assert_eq!(t.tick(), TICK);
        (t, t0)
    }

    fn keys_sorted(out: &[(u32, u32)]) -> Vec<u32> {
        let mut k: Vec<u32> = out.iter().map(|&(k, _)| k).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn full_table_refuses_and_keeps_existing_flows() {
        let (mut t, t0) = table(3);
        for k in 0..3 {
            t.insert(k, k * 10, t0).unwrap();
        }
        let Err(Full(v)) = t.insert(99, 990, t0) else {
            panic!("insert into a full table succeeded");
        };
        assert_eq!(v, 990, "refused value is handed back");
        assert_eq!(t.len(), 3);
        assert!(!t.contains_key(&99));
        for k in 0..3 {
            assert_eq!(t.get(&k, t0).copied(), Some(k * 10));
        }
        // Replacing an existing key needs no room.
        assert_eq!(t.insert(1, 11, t0).map(|v| *v).ok(), Some(11));
        assert_eq!(t.get(&1, t0).copied(), Some(11));
        // Room again after a removal.
        assert_eq!(t.remove(&0), Some(0));
        assert!(t.insert(99, 990, t0).is_ok());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn zero_capacity_refuses_everything() {
        let (mut t, t0) = table(0);
        assert!(t.insert(1, 1, t0).is_err());
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn flow_refreshed_every_half_timeout_never_expires() {
        for via_touch in [false, true] {
            let (mut t, t0) = table(4);
            t.insert(1, 1, t0).unwrap();
            t.insert(2, 2, t0).unwrap();
            let mut out = Vec::new();
            let half = TIMEOUT / 2;
            for i in 1..=200u32 {
                let now = t0 + half * i;
                if via_touch {
                    assert!(t.touch(&1, now));
                } else {
                    assert!(t.get(&1, now).is_some());
                }
                // Expire at every tick of the half-timeout, as a worker would.
                for j in 1..=32u32 {
                    t.expire(now + TICK * j, &mut out);
                }
            }
            assert_eq!(keys_sorted(&out), vec![2], "only the idle flow expires");
            assert!(t.contains_key(&1));
        }
    }

    #[test]
    fn idle_flow_expires_within_timeout_plus_tick() {
        // Offsets within a tick, so that the slot phase varies.
        for offset_ms in [0u64, 1, 250, 500, 999] {
            let (mut t, t0) = table(4);
            let start = t0 + Duration::from_millis(offset_ms);
            t.insert(7, 70, start).unwrap();
            let mut out = Vec::new();
            t.expire(start + TIMEOUT - Duration::from_nanos(1), &mut out);
            assert!(out.is_empty(), "expired early (offset {offset_ms} ms)");
            assert!(t.contains_key(&7));
            t.expire(start + TIMEOUT + TICK, &mut out);
            assert_eq!(out, vec![(7, 70)], "not expired by timeout + tick");
            assert!(t.is_empty());
            assert_eq!(t.next_deadline(), None);
        }
    }

    #[test]
    fn next_deadline_is_within_one_tick_of_expiry() {
        let (mut t, t0) = table(4);
        let start = t0 + Duration::from_millis(300);
        t.insert(7, 70, start).unwrap();
        let d = t.next_deadline().unwrap();
        assert!(d >= start + TIMEOUT && d <= start + TIMEOUT + TICK, "{d:?}");
        let mut out = Vec::new();
        t.expire(d, &mut out);
        assert_eq!(out, vec![(7, 70)]);
    }

    #[test]
    fn both_directions_refresh() {
        let (mut t, t0) = table(4);
        t.insert(1, 1, t0).unwrap();
        t.insert(2, 2, t0).unwrap();
        let late = t0 + TIMEOUT - TICK;
        assert!(t.get(&1, late).is_some()); // client -> backend
        assert!(t.touch(&2, late)); // backend -> client
        let mut out = Vec::new();
        t.expire(t0 + TIMEOUT + TICK * 2, &mut out);
        assert!(out.is_empty(), "refreshed flows expired: {out:?}");
        t.expire(late + TIMEOUT + TICK, &mut out);
        assert_eq!(keys_sorted(&out), vec![1, 2]);
        assert!(!t.touch(&1, late), "touch of a gone flow reports false");
    }

    #[test]
    fn remove_drops_the_flow_and_its_timer() {
        let (mut t, t0) = table(4);
        t.insert(1, 10, t0).unwrap();
        t.insert(2, 20, t0).unwrap();
        assert_eq!(t.remove(&1), Some(10));
        assert_eq!(t.remove(&1), None);
        assert!(t.get(&1, t0).is_none());
        assert_eq!(t.len(), 1);
        // Re-inserted later: the old timer must not expire the new flow early.
        let later = t0 + TIMEOUT / 2;
        t.insert(1, 11, later).unwrap();
        let mut out = Vec::new();
        t.expire(t0 + TIMEOUT + TICK, &mut out);
        assert_eq!(out, vec![(2, 20)]);
        t.expire(later + TIMEOUT + TICK, &mut out);
        assert_eq!(out, vec![(2, 20), (1, 11)]);
    }

    #[test]
    fn retain_drops_matching_flows() {
        let (mut t, t0) = table(100);
        for k in 0..100 {
            t.insert(k, k % 3, t0).unwrap();
        }
        t.retain(|_, backend| *backend != 1);
        assert_eq!(t.len(), 67);
        assert!(!t.contains_key(&1) && t.contains_key(&0) && t.contains_key(&2));
        // The dropped flows left the wheel too: only the kept ones expire.
        let mut out = Vec::new();
        t.expire(t0 + TIMEOUT + TICK, &mut out);
        assert_eq!(out.len(), 67);
        assert!(out.iter().all(|&(k, v)| v != 1 && k % 3 != 1));
    }

    #[test]
    fn day_long_jump_expires_all_with_bounded_walk() {
        let (mut t, t0) = table(100_000);
        for k in 0..100_000u32 {
            // Spread over one timeout so every slot is in use.
            let at = t0 + TIMEOUT * k / 100_000;
            t.insert(k, k, at).unwrap();
        }
        let mut out = Vec::new();
        t.expire(t0 + Duration::from_secs(86_400), &mut out);
        assert_eq!(out.len(), 100_000);
        assert!(t.is_empty());
        assert_eq!(t.ticks_walked, SLOTS, "walk not capped at one rotation");
        // And the next jump starts from there, not from the origin.
        t.insert(1, 1, t0 + Duration::from_secs(2 * 86_400)).unwrap();
        t.expire(t0 + Duration::from_secs(3 * 86_400), &mut out);
        assert_eq!(t.ticks_walked, 2 * SLOTS);
        assert!(t.is_empty());
    }

    #[test]
    fn expire_walks_only_ticks_that_passed() {
        let (mut t, t0) = table(4);
        t.insert(1, 1, t0).unwrap();
        let mut out = Vec::new();
        t.expire(t0 + TICK * 10, &mut out);
        assert_eq!(t.ticks_walked, 11); // ticks 0..=10
        t.expire(t0 + TICK * 10, &mut out);
        assert_eq!(t.ticks_walked, 11, "repeat call walked again");
    }

    #[test]
    fn time_going_backwards_loses_nothing() {
        let (mut t, t0) = table(4);
        let mut out = Vec::new();
        t.expire(t0 + TIMEOUT * 3, &mut out);
        // A stale `now` on insert: the flow is overdue, not lost in a passed slot.
        t.insert(1, 1, t0).unwrap();
        t.expire(t0 + TIMEOUT * 3 + TICK, &mut out);
        assert_eq!(out, vec![(1, 1)]);
        // A stale refresh does not shorten a flow's life.
        t.insert(2, 2, t0 + TIMEOUT * 4).unwrap();
        assert!(t.touch(&2, t0));
        t.expire(t0 + TIMEOUT * 5 - TICK, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn storage_is_reused_not_grown() {
        let (mut t, t0) = table(8);
        for round in 0..1000u32 {
            for k in 0..8 {
                t.insert(k, round, t0).unwrap();
            }
            for k in 0..8 {
                assert_eq!(t.remove(&k), Some(round));
            }
        }
        assert_eq!(t.slab.len(), 8);
        assert_eq!(t.nonempty, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8),
        Get(u8),
        Touch(u8),
        Remove(u8),
        Expire,
        Retain(u8),
    }

    fn op() -> impl Strategy<Value = (Op, u64)> {
        let op = prop_oneof![
            4 => any::<u8>().prop_map(|k| Op::Insert(k % 48)),
            3 => any::<u8>().prop_map(|k| Op::Get(k % 48)),
            3 => any::<u8>().prop_map(|k| Op::Touch(k % 48)),
            1 => any::<u8>().prop_map(|k| Op::Remove(k % 48)),
            3 => Just(Op::Expire),
            1 => any::<u8>().prop_map(|m| Op::Retain(m % 4 + 2)),
        ];
        // Time advance in ms: mostly sub-tick and a few ticks, sometimes whole
        // timeouts, rarely a long pause.
        let dt = prop_oneof![
            6 => 0u64..2_000,
            3 => 0u64..80_000,
            1 => 0u64..5_000_000,
        ];
        (op, dt)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against a naive model (key -> value, last seen): after every `expire`, a
        /// flow idle for less than the timeout is live, one idle for timeout + tick
        /// or more is gone, and anything else matches what `expire` reported.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec(op(), 1..300), cap in 1usize..40) {
            let (mut t, t0) = table(cap);
            let mut model: HashMap<u32, (u32, Instant)> = HashMap::new();
            let mut now = t0;
            let mut serial = 0u32;
            let mut out = Vec::new();
            for (op, dt) in ops {
                now += Duration::from_millis(dt);
                match op {
                    Op::Insert(k) => {
                        let k = u32::from(k);
                        serial += 1;
                        let res = t.insert(k, serial, now).map(|v| *v);
                        if model.contains_key(&k) || model.len() < cap {
                            prop_assert_eq!(res.ok(), Some(serial));
                            model.insert(k, (serial, now));
                        } else {
                            prop_assert!(matches!(res, Err(Full(v)) if v == serial));
                        }
                    }
                    Op::Get(k) => {
                        let k = u32::from(k);
                        let got = t.get(&k, now).copied();
                        let want = model.get_mut(&k).map(|e| { e.1 = now; e.0 });
                        prop_assert_eq!(got, want);
                    }
                    Op::Touch(k) => {
                        let k = u32::from(k);
                        let want = model.get_mut(&k).map(|e| e.1 = now).is_some();
                        prop_assert_eq!(t.touch(&k, now), want);
                    }
                    Op::Remove(k) => {
                        let k = u32::from(k);
                        prop_assert_eq!(t.remove(&k), model.remove(&k).map(|e| e.0));
                    }
                    Op::Retain(m) => {
                        let m = u32::from(m);
                        t.retain(|k, _| k % m != 0);
                        model.retain(|k, _| k % m != 0);
                    }
                    Op::Expire => {
                        out.clear();
                        t.expire(now, &mut out);
                        for &(k, v) in &out {
                            let (mv, seen) = model.remove(&k).expect("expired an unknown flow");
                            prop_assert_eq!(v, mv);
                            prop_assert!(now - seen >= TIMEOUT, "expired early: idle {:?}", now - seen);
                        }
                        for (k, &(_, seen)) in &model {
                            prop_assert!(now - seen < TIMEOUT + TICK, "flow {} idle {:?} kept", k, now - seen);
                        }
                        // A caller sleeping until `next_deadline` must not miss expiry.
                        if let Some((_, seen)) = model.values().min_by_key(|e| e.1) {
                            let d = t.next_deadline().expect("live flows but no deadline");
                            prop_assert!(d <= *seen + TIMEOUT + TICK);
                        }
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                prop_assert_eq!(t.next_deadline().is_none(), model.is_empty());
                for k in model.keys() {
                    prop_assert!(t.contains_key(k));
                }
            }
        }
    }
}
