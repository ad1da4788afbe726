//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016): a pure, deterministic lookup table.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::iter::FusedIterator;

use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3Default};

/// Default table size: prime, and more than 100 x the backends of any pool we expect,
/// which keeps the slot imbalance under 1%.
pub const DEFAULT_TABLE_SIZE: usize = 65537;

/// Seed of the hash that gives a backend its first preferred slot (`offset`).
///
/// Part of ringlb's fleet contract, like the flow-key seed: every instance must
/// compute the same permutations to build the same table. Changing it moves
/// nearly every flow of every pool when the fleet is upgraded.
pub const OFFSET_SEED: u64 = 0x7269_6e67_6c62_0010;

/// Seed of the hash that gives a backend its step through the table (`skip`).
///
/// Fleet contract, exactly as [`OFFSET_SEED`].
pub const SKIP_SEED: u64 = 0x7269_6e67_6c62_0011;

/// Most backends [`MaglevTable::candidates`] yields; larger requests are clamped.
pub const MAX_CANDIDATES: usize = 16;

/// Marks a slot not yet taken while building. Never a backend index: `build`
/// accepts at most `u32::MAX` backends, so indexes stop at `u32::MAX - 1`.
const EMPTY: u32 = u32::MAX;

/// Why a Maglev table cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is not prime; Maglev needs a prime so every skip walks every slot.
    #[error("maglev table size {0} is not prime (e.g. 65537, 131071, 655373)")]
    NotPrime(usize),
    /// Fewer slots than backends with weight > 0: each of them must get a slot.
    #[error("maglev table size {size} is smaller than its {backends} weighted backends")]
    TooSmall {
        /// The requested table size.
        size: usize,
        /// How many backends have weight > 0.
        backends: usize,
    },
    /// No backend, or every weight is 0: there is nothing to fill the table with.
    #[error("maglev table has no backend with weight > 0")]
    NoWeight,
    /// Two backends share one identity; they would hash identically, so the
    /// table could not tell them apart (checked whatever their weights).
    #[error("backends {first} and {second} have the same identity")]
    Duplicate {
        /// Input index of the first of the two.
        first: usize,
        /// Input index of the second of the two.
        second: usize,
    },
    /// The table size or the number of backends does not fit the table's `u32` entries.
    #[error("{0} is too large for a maglev table (limit {limit})", limit = u32::MAX)]
    TooLarge(usize),
}

/// Whether `n` is prime. Deterministic Miller-Rabin, exact for every `u64`.
pub fn is_prime(n: u64) -> bool {
    // These bases are known to decide primality for every n < 3.3e24 (so all u64).
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for p in BASES {
        if n % p == 0 {
            return n == p;
        }
    }
    // n is odd and > 37 here: write n - 1 = d * 2^s with d odd.
    let s = (n - 1).trailing_zeros();
    let d = (n - 1) >> s;
    'bases: for a in BASES {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mul_mod(x, x, n);
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

fn mul_mod(a: u64, b: u64, m: u64) -> u64 {
    // u128 keeps the product exact for any u64 modulus.
    ((u128::from(a) * u128::from(b)) % u128::from(m)) as u64
}

fn pow_mod(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut acc = 1;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul_mod(acc, base, m);
        }
        base = mul_mod(base, base, m);
        exp >>= 1;
    }
    acc
}

/// A built Maglev lookup table: `size` slots, each holding a backend index.
///
/// Immutable once built; rebuild it off the hot path and publish the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
    /// Backends with weight > 0, i.e. distinct values in `slots`.
    weighted: usize,
}

/// A backend's walk through its preference list while the table fills.
///
/// Only the cursor and the step are kept (8 bytes of state plus the index), never
/// the M-entry permutation itself, so a build needs O(N) memory beside the table.
struct Cursor {
    /// Input index written into the slots this backend takes.
    index: u32,
    /// Next slot of its permutation to try.
    next: u32,
    /// Step between successive preferred slots, in 1..M.
    skip: u32,
}

impl Cursor {
    /// Takes this backend's next preferred slot that is still empty.
    /// The table must have an empty slot: M prime means the walk visits all M.
    #[inline]
    fn take_slot(&mut self, slots: &mut [u32], m: u32) {
        loop {
            let slot = self.next;
            // `(next + skip) % m` without the division (a hot spot in Envoy's build),
            // written so that it cannot overflow even when m is near u32::MAX.
            let back = m - self.skip;
            self.next = if slot >= back { slot - back } else { slot + self.skip };
            let entry = &mut slots[slot as usize];
            if *entry == EMPTY {
                *entry = self.index;
                return;
            }
        }
    }
}

// === impl MaglevTable ===

impl MaglevTable {
    /// Builds a table of `size` slots (prime) from `backends`: pairs of a stable
    /// identity (the bytes hashed, e.g. the address text `"10.0.0.1:80"`) and a weight.
    ///
    /// Slot values are indexes into `backends` in the order given, but which
    /// backend owns which slot depends only on the set of (identity, weight)
    /// pairs: backends are sorted by identity first, so any order of the same
    /// set gives the same table once indexes are mapped back to identities.
    ///
    /// Weights: a backend takes a turn on round `i` when
    /// `i * weight >= turns_so_far * max_weight`, so the heaviest takes every
    /// round and slot counts are proportional to weight; within a round,
    /// heavier backends go first, then by identity. Every backend with
    /// weight > 0 gets at least one slot; weight 0 gets none and leaves the
    /// table exactly as if the backend were absent.
    ///
    /// Errors, checked in this order: [`MaglevError::TooLarge`] (size or backend
    /// count above `u32::MAX`), [`MaglevError::NotPrime`], [`MaglevError::Duplicate`]
    /// (two backends with the same identity, whatever their weights: a
    /// configuration mistake to surface, not to guess about),
    /// [`MaglevError::NoWeight`], [`MaglevError::TooSmall`].
    pub fn build<K: AsRef<[u8]>>(backends: &[(K, u32)], size: usize) -> Result<Self, MaglevError> {
        let m = u32::try_from(size).map_err(|_| MaglevError::TooLarge(size))?;
        if u32::try_from(backends.len()).is_err() {
            return Err(MaglevError::TooLarge(backends.len()));
        }
        if !is_prime(u64::from(m)) {
            return Err(MaglevError::NotPrime(size));
        }
        let id = |i: u32| backends[i as usize].0.as_ref();
        let weight = |i: u32| backends[i as usize].1;

        // Sorting by identity is what makes the table independent of input order.
        // Ties are broken by index only so a duplicate report names the lowest pair.
        let mut order: Vec<u32> = (0..backends.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| id(a).cmp(id(b)).then(a.cmp(&b)));
        if let Some(pair) = order.windows(2).find(|p| id(p[0]) == id(p[1])) {
            return Err(MaglevError::Duplicate {
                first: pair[0] as usize,
                second: pair[1] as usize,
            });
        }
        order.retain(|&i| weight(i) > 0);
        // Heaviest first; the sort is stable, so equal weights stay in identity order.
        order.sort_by_key(|&i| Reverse(weight(i)));
        if order.is_empty() {
            return Err(MaglevError::NoWeight);
        }
        if order.len() > size {
            return Err(MaglevError::TooSmall {
                size,
                backends: order.len(),
            });
        }

        let mut cursors: Vec<Cursor> = order
            .iter()
            .map(|&i| {
                let key = id(i);
                let offset = xxh3_64_with_seed(key, OFFSET_SEED) % u64::from(m);
                // m >= 2 as it is prime, so the modulus m - 1 is never 0.
                let skip = xxh3_64_with_seed(key, SKIP_SEED) % u64::from(m - 1) + 1;
                Cursor {
                    index: i,
                    next: offset as u32,
                    skip: skip as u32,
                }
            })
            .collect();
        let weights: Vec<u64> = order.iter().map(|&i| u64::from(weight(i))).collect();
        let slots = fill(&mut cursors, &weights, m);
        Ok(MaglevTable {
            slots,
            weighted: order.len(),
        })
    }

    /// Number of slots (the prime `size` given to [`MaglevTable::build`]).
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Number of backends with weight > 0, i.e. of distinct backends in the table.
    pub fn backends(&self) -> usize {
        self.weighted
    }

    /// The slots in order; each is an index into the slice given to `build`.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The slot a flow hash maps to: exactly `hash % size`, the same on every
    /// architecture. (A multiply-shift reduction would be a little faster but
    /// uses only the hash's high bits; plain modulo keeps `lookup(i)` = slot `i`.)
    #[inline]
    pub fn slot_for(&self, hash: u64) -> usize {
        (hash % self.slots.len() as u64) as usize
    }

    /// The backend index for a flow hash: one modulo and one array read.
    #[inline]
    pub fn lookup(&self, hash: u64) -> u32 {
        self.slots[self.slot_for(hash)]
    }

    /// Distinct backend indexes in this flow's preference order: first
    /// [`lookup(hash)`](MaglevTable::lookup), then each new backend met walking
    /// forward from that slot (wrapping). Yields `min(max, 16, backends())`
    /// items; used to retry another backend deterministically.
    ///
    /// Never allocates; walks at most `size` slots in total, and usually only a
    /// few, since it stops as soon as it has found all it can yield.
    pub fn candidates(&self, hash: u64, max: usize) -> Candidates<'_> {
        Candidates {
            slots: &self.slots,
            pos: self.slot_for(hash),
            steps_left: self.slots.len(),
            want: max.min(MAX_CANDIDATES).min(self.weighted),
            seen: [0; MAX_CANDIDATES],
            found: 0,
        }
    }

    /// Slots owned by each backend index, for tests and diagnostics. The result
    /// has `backends` entries (pass the length of the slice given to `build`),
    /// grown if a slot holds a larger index, so it never panics.
    pub fn slot_counts(&self, backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for &b in &self.slots {
            let b = b as usize;
            if b >= counts.len() {
                counts.resize(b + 1, 0);
            }
            counts[b] += 1;
        }
        counts
    }

    /// XXH3-64 (no seed) of the slots as little-endian `u32`s: a fingerprint
    /// for golden tests and for `ctl` to show whether two instances agree.
    pub fn digest(&self) -> u64 {
        let mut hasher = Xxh3Default::new();
        // Fixed-size chunks: no allocation, and the streaming digest equals the
        // one-shot digest of the whole byte string.
        let mut buf = [0u8; 4 * 256];
        for chunk in self.slots.chunks(256) {
            for (dst, s) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&s.to_le_bytes());
            }
            hasher.update(&buf[..4 * chunk.len()]);
        }
        hasher.digest()
    }
}

/// Backends of one weight: they are due on the same rounds, so they are
/// scheduled together. `cursors[start..end]` holds them in identity order.
struct Group {
    start: usize,
    end: usize,
    weight: u64,
    /// Turns the group has taken so far.
    turns: u64,
}

/// Fills `m` slots from `cursors`, ordered by weight (heaviest first), then identity.
///
/// Round `i` gives a turn to every backend with `i * weight >= turns * max_weight`;
/// within a round, heavier backends go first, then by identity. Backends of equal
/// weight stay in lockstep (all start due on round 0), so the schedule is kept per
/// weight group: the heaviest group is due every round, and lighter groups wait
/// in a min-heap keyed by (round next due, group rank). Popping it yields exactly
/// that order without scanning backends that are not due (a naive scan costs
/// O(N) per round: ~65M checks for 1023 light backends + 1 heavy one).
fn fill(cursors: &mut [Cursor], weights: &[u64], m: u32) -> Vec<u32> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.weight == w => g.end = i + 1,
            _ => groups.push(Group {
                start: i,
                end: i + 1,
                weight: w,
                turns: 0,
            }),
        }
    }
    let max_w = groups[0].weight;
    let heaviest = groups[0].start..groups[0].end;
    // Every group is due on round 0, which is what guarantees each backend a slot.
    let mut lighter: BinaryHeap<Reverse<(u64, usize)>> = (1..groups.len()).map(|g| Reverse((0, g))).collect();
    let mut slots = vec![EMPTY; m as usize];
    let mut filled: u32 = 0;
    let mut take_turns = |cursors: &mut [Cursor], slots: &mut [u32]| {
        for cursor in cursors {
            cursor.take_slot(slots, m);
            filled += 1;
            if filled == m {
                return true;
            }
        }
        false
    };
    // The heaviest group takes >= 1 slot every round, so this ends by round m.
    for round in 0u64.. {
        if take_turns(&mut cursors[heaviest.clone()], &mut slots) {
            break;
        }
        while let Some(mut top) = lighter.peek_mut() {
            let Reverse((due, g)) = *top;
            if due != round {
                // Each group is rescheduled strictly later than the round it ran in.
                debug_assert!(due > round);
                break;
            }
            let group = &mut groups[g];
            if take_turns(&mut cursors[group.start..group.end], &mut slots) {
                return slots;
            }
            group.turns += 1;
            // First round i with i * w >= turns * max_w. u128 because turns * max_w can
            // approach 2^64; a saturated round is past m, so it is never reached.
            let next = (u128::from(group.turns) * u128::from(max_w)).div_ceil(u128::from(group.weight));
            // Replacing the top in place re-sifts once, instead of a pop and a push.
            *top = Reverse((u64::try_from(next).unwrap_or(u64::MAX), g));
        }
    }
    slots
}

/// Iterator returned by [`MaglevTable::candidates`]: distinct backend indexes
/// in a flow's preference order.
#[derive(Clone, Debug)]
pub struct Candidates<'a> {
    slots: &'a [u32],
    /// Next slot to read.
    pos: usize,
    /// Slots still allowed to be read; bounds the walk to one lap.
    steps_left: usize,
    /// How many distinct backends to yield in total.
    want: usize,
    /// Backends yielded so far (the first `found` entries).
    seen: [u32; MAX_CANDIDATES],
    found: usize,
}

impl Iterator for Candidates<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        while self.found < self.want && self.steps_left > 0 {
            let b = self.slots[self.pos];
            self.pos += 1;
            if self.pos == self.slots.len() {
                self.pos = 0;
            }
            self.steps_left -= 1;
            // A linear scan of at most 16 u32s beats any set at this size.
            if !self.seen[..self.found].contains(&b) {
                self.seen[self.found] = b;
                self.found += 1;
                return Some(b);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Exact: every weighted backend owns a slot, so one lap finds `want` of them.
        let left = self.want - self.found;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Candidates<'_> {}

impl FusedIterator for Candidates<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `n` distinct address-like identities.
    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 0xff, i & 0xff))
            .collect()
    }

    fn equal(n: usize) -> Vec<(String, u32)> {
        ids(n).into_iter().map(|id| (id, 1)).collect()
    }

    /// The table with every slot replaced by the identity it points to.
    fn by_identity<'a>(t: &MaglevTable, backends: &'a [(String, u32)]) -> Vec<&'a str> {
        t.slots().iter().map(|&i| backends[i as usize].0.as_str()).collect()
    }

    /// The textbook algorithm, written independently: a full permutation per
    /// backend computed with `%`, and every backend's turn checked every round
    /// in (weight descending, identity) order.
    fn reference(backends: &[(String, u32)], m: usize) -> Vec<u32> {
        let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
        order.sort_by(|&a, &b| (backends[b].1, &backends[a].0).cmp(&(backends[a].1, &backends[b].0)));
        let m64 = m as u64;
        let perms: Vec<Vec<usize>> = order
            .iter()
            .map(|&i| {
                let key = backends[i].0.as_bytes();
                let offset = xxh3_64_with_seed(key, OFFSET_SEED) % m64;
                let skip = xxh3_64_with_seed(key, SKIP_SEED) % (m64 - 1) + 1;
                (0..m64).map(|j| ((offset + j * skip) % m64) as usize).collect()
            })
            .collect();
        let max_w = order.iter().map(|&i| u64::from(backends[i].1)).max().unwrap();
        let mut next = vec![0usize; order.len()];
        let mut turns = vec![0u64; order.len()];
        let mut slots = vec![None; m];
        let mut filled = 0;
        for round in 0u64.. {
            for (p, &i) in order.iter().enumerate() {
                if round * u64::from(backends[i].1) < turns[p] * max_w {
                    continue;
                }
                turns[p] += 1;
                while slots[perms[p][next[p]]].is_some() {
                    next[p] += 1;
                }
                slots[perms[p][next[p]]] = Some(i as u32);
                filled += 1;
                if filled == m {
                    return slots.into_iter().map(Option::unwrap).collect();
                }
            }
        }
        unreachable!()
    }

    #[test]
    fn is_prime_known_values() {
        let primes = [
            2u64, 3, 5, 7, 11, 13, 17, 31, 37, 41, 4093, 16381, 65537, 131071, 655373,
        ];
        for p in primes {
            assert!(is_prime(p), "{p}");
        }
        // 561 and 1105 are Carmichael numbers; 3215031751 is a strong pseudoprime to 2, 3, 5, 7.
        let composites = [0u64, 1, 4, 9, 15, 21, 25, 561, 1105, 65535, 65536, 3_215_031_751];
        for c in composites {
            assert!(!is_prime(c), "{c}");
        }
        assert!(is_prime(18_446_744_073_709_551_557)); // largest u64 prime
        assert!(!is_prime(u64::MAX));
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(4_294_967_297)); // 2^32 + 1 = 641 * 6700417
    }

    #[test]
    fn is_prime_matches_trial_division() {
        let slow = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
        for n in 0..20_000 {
            assert_eq!(is_prime(n), slow(n), "{n}");
        }
    }

    #[test]
    fn equal_weights_get_floor_or_ceil() {
        let cases = [
            (65537, 3),
            (65537, 10),
            (65537, 100),
            (65537, 400),
            (7, 3),
            (7, 7),
            (13, 5),
            (101, 10),
            (1009, 100),
        ];
        for (m, n) in cases {
            let b = equal(n);
            let t = MaglevTable::build(&b, m).unwrap();
            let counts = t.slot_counts(n);
            assert_eq!(counts.len(), n);
            let (lo, hi) = (m / n, m.div_ceil(n));
            for (i, &c) in counts.iter().enumerate() {
                assert!(c == lo || c == hi, "M={m} N={n}: backend {i} has {c} slots");
            }
        }
    }

    #[test]
    fn weights_are_proportional() {
        for weights in [vec![1u32, 2, 3, 4], vec![1, 1, 2], vec![10, 30], vec![7, 7, 7, 1]] {
            let b: Vec<(String, u32)> = ids(weights.len()).into_iter().zip(weights.iter().copied()).collect();
            let t = MaglevTable::build(&b, DEFAULT_TABLE_SIZE).unwrap();
            let total: u32 = weights.iter().sum();
            for (i, &c) in t.slot_counts(b.len()).iter().enumerate() {
                let want = DEFAULT_TABLE_SIZE as f64 * f64::from(weights[i]) / f64::from(total);
                let err = (c as f64 - want).abs() / want;
                assert!(err <= 0.01, "weights {weights:?}: backend {i} has {c}, want {want:.0}");
            }
        }
    }

    #[test]
    fn weights_one_to_two_at_17() {
        // Envoy's anchor case: 1:2 in a table of 17 gives 6 and 11 slots.
        let b = vec![("a".to_string(), 1), ("b".to_string(), 2)];
        let t = MaglevTable::build(&b, 17).unwrap();
        assert_eq!(t.slot_counts(2), vec![6, 11]);
    }

    #[test]
    fn light_backends_each_get_exactly_one_slot_beside_a_heavy_one() {
        for heavy in [1_000_000, u32::MAX] {
            let mut b = equal(1023);
            b.push(("heavy".to_string(), heavy));
            let t = MaglevTable::build(&b, DEFAULT_TABLE_SIZE).unwrap();
            let counts = t.slot_counts(b.len());
            assert!(counts[..1023].iter().all(|&c| c == 1), "heavy = {heavy}");
            assert_eq!(counts[1023], DEFAULT_TABLE_SIZE - 1023);
        }
    }

    #[test]
    fn every_weighted_backend_gets_a_slot_even_when_size_equals_count() {
        let b: Vec<(String, u32)> = ids(7).into_iter().zip([1, 100, 1, 50, 1, 1, 9]).collect();
        let t = MaglevTable::build(&b, 7).unwrap();
        assert_eq!(t.slot_counts(7), vec![1; 7]);
    }

    #[test]
    fn zero_weight_backends_are_as_if_absent() {
        let mut b = equal(20);
        let without: Vec<(String, u32)> = b[5..].to_vec();
        for x in &mut b[..5] {
            x.1 = 0;
        }
        let t = MaglevTable::build(&b, 1009).unwrap();
        let u = MaglevTable::build(&without, 1009).unwrap();
        assert!(t.slot_counts(20)[..5].iter().all(|&c| c == 0));
        assert_eq!(by_identity(&t, &b), by_identity(&u, &without));
        assert_eq!(t.backends(), 15);
    }

    #[test]
    fn removing_one_backend_moves_few_slots() {
        let m = DEFAULT_TABLE_SIZE;
        for n in [10usize, 100, 1000] {
            let all = equal(n);
            let before = MaglevTable::build(&all, m).unwrap();
            let before = by_identity(&before, &all);
            for gone in [0, n / 2, n - 1] {
                let mut rest = all.clone();
                rest.remove(gone);
                let after = MaglevTable::build(&rest, m).unwrap();
                let after = by_identity(&after, &rest);
                let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
                let share = moved as f64 / m as f64;
                let limit = 1.0 / n as f64 + 0.015;
                assert!(
                    share <= limit,
                    "N={n}, removed {gone}: {share:.4} of slots moved > {limit:.4}"
                );
            }
        }
    }

    #[test]
    fn golden_tiny_table() {
        // Pinned: a change here means every deployed table changes. Do not update
        // casually; it is part of the fleet contract with OFFSET_SEED and SKIP_SEED.
        let b: Vec<(String, u32)> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
            .iter()
            .map(|s| (s.to_string(), 1))
            .collect();
        let t = MaglevTable::build(&b, 7).unwrap();
        let want = [
            "10.0.0.2:80",
            "10.0.0.1:80",
            "10.0.0.3:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.1:80",
            "10.0.0.1:80",
        ];
        assert_eq!(by_identity(&t, &b), want);
    }

    #[test]
    fn golden_default_table_digest() {
        // Pinned like golden_tiny_table: 10 backends at the default size, equal
        // weights and weights 1..=10.
        let b = equal(10);
        let t = MaglevTable::build(&b, DEFAULT_TABLE_SIZE).unwrap();
        let weighted: Vec<(String, u32)> = ids(10).into_iter().zip(1..).collect();
        let w = MaglevTable::build(&weighted, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(t.digest(), 0xb832_dfb6_4051_751d);
        assert_eq!(w.digest(), 0x9e87_1476_4f65_e60b);
    }

    #[test]
    fn digest_is_xxh3_of_little_endian_slots() {
        let t = MaglevTable::build(&equal(5), 1009).unwrap();
        let bytes: Vec<u8> = t.slots().iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(t.digest(), xxhash_rust::xxh3::xxh3_64(&bytes));
    }

    #[test]
    fn errors() {
        let b = equal(8);
        assert_eq!(MaglevTable::build(&b, 65536), Err(MaglevError::NotPrime(65536)));
        assert_eq!(MaglevTable::build(&b, 1), Err(MaglevError::NotPrime(1)));
        assert_eq!(MaglevTable::build(&b, 0), Err(MaglevError::NotPrime(0)));
        assert_eq!(
            MaglevTable::build(&b, 7),
            Err(MaglevError::TooSmall { size: 7, backends: 8 })
        );
        let zero: Vec<(String, u32)> = ids(3).into_iter().map(|id| (id, 0)).collect();
        assert_eq!(MaglevTable::build(&zero, 7), Err(MaglevError::NoWeight));
        let empty: [(&str, u32); 0] = [];
        assert_eq!(MaglevTable::build(&empty, 7), Err(MaglevError::NoWeight));
        // Zero-weight backends do not count towards TooSmall.
        let mut mostly_zero = equal(20);
        for x in &mut mostly_zero[3..] {
            x.1 = 0;
        }
        assert!(MaglevTable::build(&mostly_zero, 7).is_ok());
        let dup = [("a", 1), ("b", 1), ("c", 0), ("b", 2), ("c", 0)];
        assert_eq!(
            MaglevTable::build(&dup, 7),
            Err(MaglevError::Duplicate { first: 1, second: 3 })
        );
        assert_eq!(
            MaglevTable::build(&[("x", 1)], (u32::MAX as usize) + 1),
            Err(MaglevError::TooLarge(1 << 32))
        );
    }

    #[test]
    fn smallest_tables() {
        let t = MaglevTable::build(&[("only", 5)], 2).unwrap();
        assert_eq!(t.slots(), &[0, 0]);
        let t = MaglevTable::build(&[("a", 1), ("b", 1)], 2).unwrap();
        assert_eq!(t.slot_counts(2), vec![1, 1]);
    }

    #[test]
    fn lookup_is_slot_of_hash_mod_size() {
        let t = MaglevTable::build(&equal(10), 101).unwrap();
        for h in [0u64, 1, 100, 101, 102, 12_345_678_901, u64::MAX] {
            assert_eq!(t.slot_for(h), (h % 101) as usize);
            assert_eq!(t.lookup(h), t.slots()[(h % 101) as usize]);
        }
    }

    #[test]
    fn candidates_are_distinct_and_start_with_lookup() {
        let b = equal(40);
        let t = MaglevTable::build(&b, 4093).unwrap();
        for h in (0..2000u64).map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())) {
            for max in [0, 1, 2, 5, 16, 17, 1000] {
                let got: Vec<u32> = t.candidates(h, max).collect();
                assert_eq!(got.len(), max.min(MAX_CANDIDATES).min(40));
                assert_eq!(t.candidates(h, max).len(), got.len());
                if max > 0 {
                    assert_eq!(got[0], t.lookup(h));
                }
                let mut dedup = got.clone();
                dedup.sort_unstable();
                dedup.dedup();
                assert_eq!(dedup.len(), got.len(), "repeated candidate for hash {h}");
                assert_eq!(got, t.candidates(h, max).collect::<Vec<_>>());
                // Preference order: a prefix of the longer list.
                assert_eq!(got[..], t.candidates(h, 16).collect::<Vec<_>>()[..got.len()]);
            }
        }
    }

    #[test]
    fn candidates_find_every_backend_when_fewer_than_max() {
        // One backend owns a single slot: the walk must still reach it.
        let mut b = equal(3);
        b.push(("heavy".to_string(), u32::MAX));
        let t = MaglevTable::build(&b, 1009).unwrap();
        for h in 0..1009u64 {
            let mut got: Vec<u32> = t.candidates(h, 16).collect();
            assert_eq!(got[0], t.lookup(h));
            got.sort_unstable();
            assert_eq!(got, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn candidates_skip_zero_weight_backends() {
        let b = [("a", 1), ("b", 0), ("c", 1)];
        let t = MaglevTable::build(&b, 7).unwrap();
        let mut got: Vec<u32> = t.candidates(3, 16).collect();
        got.sort_unstable();
        assert_eq!(got, vec![0, 2]);
    }

    /// Weights (0 allowed) and a prime size small enough for many cases.
    fn weights_and_size() -> impl Strategy<Value = (Vec<u32>, usize)> {
        (
            prop::collection::vec(prop_oneof![3 => 1u32..5, 1 => Just(0u32), 1 => 1u32..1_000_000], 1..40),
            prop::sample::select(vec![7usize, 13, 101, 1009, 4093]),
        )
    }

    proptest! {
        #[test]
        fn input_order_does_not_matter(
            (weights, m, perm) in weights_and_size().prop_flat_map(|(w, m)| {
                let n = w.len();
                (Just(w), Just(m), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
            })
        ) {
            let b: Vec<(String, u32)> = ids(weights.len()).into_iter().zip(weights).collect();
            let shuffled: Vec<(String, u32)> = perm.iter().map(|&i| b[i].clone()).collect();
            let x = MaglevTable::build(&b, m);
            let y = MaglevTable::build(&shuffled, m);
            match (x, y) {
                (Ok(x), Ok(y)) => prop_assert_eq!(by_identity(&x, &b), by_identity(&y, &shuffled)),
                (x, y) => prop_assert_eq!(x, y),
            }
        }

        #[test]
        fn matches_reference_fill((weights, m) in weights_and_size()) {
            let b: Vec<(String, u32)> = ids(weights.len()).into_iter().zip(weights).collect();
            let weighted = b.iter().filter(|x| x.1 > 0).count();
            prop_assume!(weighted > 0 && weighted <= m);
            let t = MaglevTable::build(&b, m).unwrap();
            prop_assert_eq!(t.slots(), &reference(&b, m)[..]);
            let counts = t.slot_counts(b.len());
            for (c, x) in counts.iter().zip(&b) {
                prop_assert_eq!(*c == 0, x.1 == 0);
            }
        }
    }
}
