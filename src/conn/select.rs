//! The one backend selection function: client → table → balance rule → ordered candidates.
//!
//! TCP connects, UDP flow creation and `ctl route` all call [`select`] (or
//! [`select_hash`] / [`select_explained`], the same code), so `route`
//! explains exactly what a worker does.
//!
//! The rules (`balance` of the pool):
//! - `maglev`: the flow hash's Maglev preference order; reads no counter.
//! - `maglev` with `hash_balance_factor = F`: the same order, but a
//!   candidate whose load is at or over its bound is skipped (moved to the
//!   end of the list), bound_i = F/100 × (L + 1) × w_i / W, where L is the
//!   total load of the table's backends, W their total effective weight and
//!   w_i the candidate's (the `+ 1` counts the new connection, as Mirrokni et
//!   al. do). Σ bound_i > L, so some backend is always under its bound.
//! - `least_conn`: the backend with the lowest load/weight among the
//!   table's backends; ties go to the first of them in the flow hash's
//!   Maglev order (so equal loads choose deterministically, and stickily).
//! - `random_two`: two random table slots (so weighted by the table's
//!   shares), the one with the lower load/weight.
//!
//! Load is [`crate::snapshot::Backend::load`]: open connections and flows
//! over all workers plus connects in flight, summed from per-worker shards.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};

use crate::config::{Balance, HashKey};
use crate::flow_key::flow_hash;
use crate::geo::RegionId;
use crate::snapshot::PoolSnapshot;

/// Most candidates one selection returns (spill-over and retries walk them):
/// as many as the Maglev table yields, one constant.
pub use crate::maglev::MAX_CANDIDATES;

/// Which rule chose the first candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The Maglev preference order.
    Maglev,
    /// Maglev with bounded loads (`hash_balance_factor`).
    MaglevBounded,
    /// Weighted least connections.
    LeastConn,
    /// Power of two random choices.
    RandomTwo,
}

impl Rule {
    /// The name `ctl route` shows.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Maglev => "maglev",
            Rule::MaglevBounded => "maglev+bounded",
            Rule::LeastConn => "least_conn",
            Rule::RandomTwo => "random_two",
        }
    }
}

/// The backends a client may go to, most preferred first.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    /// The client's region, in a geo pool.
    pub region: Option<RegionId>,
    /// The flow hash the table was looked up with.
    pub hash: u64,
    /// The rule that ordered the candidates.
    pub rule: Rule,
    /// Whether the candidates are backups (no primary is usable).
    pub backup_tier: bool,
    indices: [u32; MAX_CANDIDATES],
    len: u8,
}

impl Selection {
    /// Backend indices (into the pool snapshot's `backends`), best first.
    pub fn candidates(&self) -> &[u32] {
        &self.indices[..self.len as usize]
    }

    fn push(&mut self, index: u32) {
        if (self.len as usize) < MAX_CANDIDATES && !self.candidates().contains(&index) {
            self.indices[self.len as usize] = index;
            self.len += 1;
        }
    }
}

/// Why a candidate was passed over (for `ctl route`).
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// Backend index.
    pub index: u32,
    /// Its load when the choice was made.
    pub load: u64,
    /// The bound it was at or over (bounded loads), or the load/weight it
    /// lost with (least_conn, random_two: the chosen one's is lower).
    pub why: SkipWhy,
}

/// The reason in [`Skipped`].
#[derive(Debug, Clone, PartialEq)]
pub enum SkipWhy {
    /// Bounded loads: `load >= bound`.
    OverBound(f64),
    /// least_conn / random_two: a higher load per weight than the chosen one.
    MoreLoaded,
    /// least_conn: the same load per weight, later in the flow's Maglev order.
    Tied,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.why {
            SkipWhy::OverBound(bound) => write!(f, "over load bound: {} open >= {:.2}", self.load, bound),
            SkipWhy::MoreLoaded => write!(f, "more loaded: {} open", self.load),
            SkipWhy::Tied => write!(f, "as loaded ({} open), later in the hash's order", self.load),
        }
    }
}

/// The candidates for `client` in `pool`, at most `max` (capped at
/// [`MAX_CANDIDATES`]); `None` when the pool has no usable backend for the
/// client (fail fast, `no_backend`).
#[inline]
pub fn select(pool: &PoolSnapshot, client: SocketAddr, key: HashKey, max: usize) -> Option<Selection> {
    select_explained(pool, client.ip(), flow_hash(client, key), max, None)
}

/// Like [`select`] with the flow hash given: UDP token routing hashes the
/// token carried in the datagram ([`crate::flow_key::token_hash`]); the
/// client's IP still picks the region's table in a geo pool.
#[inline]
pub fn select_hash(pool: &PoolSnapshot, client: IpAddr, hash: u64, max: usize) -> Option<Selection> {
    select_explained(pool, client, hash, max, None)
}

/// The selection itself; `skipped`, when given, receives the candidates the
/// rule passed over and why (`ctl route`). Plain Maglev without a balance
/// factor reads no load counter at all.
pub fn select_explained(
    pool: &PoolSnapshot,
    client: IpAddr,
    hash: u64,
    max: usize,
    mut skipped: Option<&mut Vec<Skipped>>,
) -> Option<Selection> {
    let (table, region, weights) = pool.table_and_weights(client);
    let table = table?;
    let max = max.clamp(1, MAX_CANDIDATES);
    let mut sel = Selection {
        region,
        hash,
        rule: Rule::Maglev,
        backup_tier: pool.backup_tier,
        indices: [0; MAX_CANDIDATES],
        len: 0,
    };
    match (pool.balance, pool.hash_balance_factor) {
        (Balance::Maglev, None) => {
            // The table's candidates are distinct already: written straight
            // in, as before the balance rules existed.
            for index in table.candidates(hash, max) {
                sel.indices[sel.len as usize] = index;
                sel.len += 1;
            }
        }
        (Balance::Maglev, Some(factor)) => {
            sel.rule = Rule::MaglevBounded;
            let (total_load, total_weight) = totals(pool, weights);
            let mut over = [0u32; MAX_CANDIDATES];
            let mut n_over = 0;
            // The whole preference order is walked whatever `max` is, so
            // `ctl route` (5) and a TCP connect (16) choose the same backend.
            for index in table.candidates(hash, MAX_CANDIDATES) {
                let b = &pool.backends[index as usize];
                let w = weights.get(index as usize).copied().unwrap_or(0);
                let bound =
                    f64::from(factor) / 100.0 * (total_load + 1) as f64 * f64::from(w) / total_weight.max(1) as f64;
                let load = b.load();
                if load as f64 >= bound {
                    over[n_over] = index;
                    n_over += 1;
                    if let Some(s) = skipped.as_deref_mut() {
                        s.push(Skipped {
                            index,
                            load,
                            why: SkipWhy::OverBound(bound),
                        });
                    }
                } else {
                    sel.push(index);
                }
            }
            // Backends over their bound stay as last resorts for retries.
            for &index in &over[..n_over] {
                sel.push(index);
            }
        }
        (Balance::LeastConn, _) => {
            sel.rule = Rule::LeastConn;
            let best = least_loaded(pool, weights, table.candidates(hash, MAX_CANDIDATES), hash);
            if let Some((index, _)) = best {
                sel.push(index);
            }
            if let (Some(s), Some((chosen, chosen_load))) = (skipped.as_deref_mut(), best) {
                let cw = u128::from(weights.get(chosen as usize).copied().unwrap_or(0));
                for (i, b) in pool.backends.iter().enumerate() {
                    let w = weights.get(i).copied().unwrap_or(0);
                    if i as u32 != chosen && w > 0 {
                        let load = b.load();
                        let tied = u128::from(load) * cw == u128::from(chosen_load) * u128::from(w);
                        s.push(Skipped {
                            index: i as u32,
                            load,
                            why: if tied { SkipWhy::Tied } else { SkipWhy::MoreLoaded },
                        });
                    }
                }
            }
            for index in table.candidates(hash, max) {
                sel.push(index);
            }
        }
        (Balance::RandomTwo, _) => {
            sel.rule = Rule::RandomTwo;
            let a = table.lookup(next_random());
            let mut b = table.lookup(next_random());
            // A second draw when both landed on one backend (a heavy weight
            // does that often); still weighted, as the draws are.
            if b == a && table.backends() > 1 {
                b = table.lookup(next_random());
            }
            let (wa, wb) = (
                weights.get(a as usize).copied().unwrap_or(0),
                weights.get(b as usize).copied().unwrap_or(0),
            );
            let (la, lb) = (pool.backends[a as usize].load(), pool.backends[b as usize].load());
            // load/weight compared without division: la/wa <= lb/wb.
            let (win, lose, lose_load) = if u128::from(la) * u128::from(wb) <= u128::from(lb) * u128::from(wa) {
                (a, b, lb)
            } else {
                (b, a, la)
            };
            sel.push(win);
            if let Some(s) = skipped {
                if lose != win {
                    s.push(Skipped {
                        index: lose,
                        load: lose_load,
                        why: SkipWhy::MoreLoaded,
                    });
                }
            }
            sel.push(lose);
            for index in table.candidates(hash, max) {
                sel.push(index);
            }
        }
    }
    sel.len = sel.len.min(max as u8);
    (sel.len > 0).then_some(sel)
}

/// Total load and total effective weight of the backends in the table.
fn totals(pool: &PoolSnapshot, weights: &[u32]) -> (u64, u64) {
    let mut load = 0;
    let mut weight = 0;
    for (b, &w) in pool.backends.iter().zip(weights) {
        if w > 0 {
            load += b.load();
            weight += u64::from(w);
        }
    }
    (load, weight)
}

/// The backend with the lowest load/weight among those with weight > 0,
/// and its load. Ties: the first in `order` (the flow's Maglev order), else
/// the lowest index.
fn least_loaded(
    pool: &PoolSnapshot,
    weights: &[u32],
    order: impl Iterator<Item = u32>,
    hash: u64,
) -> Option<(u32, u64)> {
    // Pass 1: the lowest load/weight, as a fraction (load, weight).
    let mut best: Option<(u64, u64)> = None;
    for (b, &w) in pool.backends.iter().zip(weights) {
        if w == 0 {
            continue;
        }
        let l = b.load();
        let lower = match best {
            None => true,
            Some((bl, bw)) => u128::from(l) * u128::from(bw) < u128::from(bl) * u128::from(w),
        };
        if lower {
            best = Some((l, u64::from(w)));
        }
    }
    let (bl, bw) = best?;
    let ties = |i: u32| {
        let w = u64::from(weights.get(i as usize).copied().unwrap_or(0));
        let l = pool.backends[i as usize].load();
        w > 0 && u128::from(l) * u128::from(bw) == u128::from(bl) * u128::from(w)
    };
    // Pass 2: the flow's own preference among the tied.
    for i in order {
        if ties(i) {
            return Some((i, pool.backends[i as usize].load()));
        }
    }
    // Tied backends beyond the first 16 of the order: spread by the hash.
    let n = pool.backends.len() as u64;
    (0..n)
        .map(|k| ((hash % n + k) % n) as u32)
        .find(|&i| ties(i))
        .map(|i| (i, pool.backends[i as usize].load()))
}

thread_local! {
    /// A per-thread xorshift state for `random_two` (no shared state, no lock).
    static RNG: Cell<u64> = Cell::new({
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        h.finish() | 1
    });
}

/// The next 64 random bits of this thread (xorshift64*).
fn next_random() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Backend;
    use std::sync::Arc;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn pool(weights: &[u32], balance: Balance, factor: Option<u32>) -> PoolSnapshot {
        let backends = (0..weights.len())
            .map(|i| Arc::new(Backend::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), 1)))
            .collect();
        let mut p = PoolSnapshot::build("p", 1, 1021, backends, weights.to_vec()).unwrap();
        p.balance = balance;
        p.hash_balance_factor = factor;
        p
    }

    fn open(p: &PoolSnapshot, i: usize, n: u64) {
        p.backends[i].stats.conns.opened.add(n);
    }

    #[test]
    fn plain_maglev_is_the_tables_order_and_reads_no_load() {
        let p = pool(&[1000, 1000, 1000], Balance::Maglev, None);
        open(&p, 0, 100);
        let s = select_hash(&p, IP, 42, MAX_CANDIDATES).unwrap();
        let order: Vec<u32> = p.table.as_ref().unwrap().candidates(42, MAX_CANDIDATES).collect();
        assert_eq!(s.candidates(), &order[..]);
        assert_eq!(s.rule, Rule::Maglev);
    }

    #[test]
    fn bounded_loads_skip_a_candidate_at_its_bound_and_keep_it_last() {
        let p = pool(&[1000, 1000, 1000], Balance::Maglev, Some(125));
        let order: Vec<u32> = p.table.as_ref().unwrap().candidates(7, MAX_CANDIDATES).collect();
        // 9 on the first choice, 8 on the second, 3 on the third: a new
        // connection's bound is 1.25 x 21 / 3 = 8.75.
        open(&p, order[0] as usize, 9);
        open(&p, order[1] as usize, 8);
        open(&p, order[2] as usize, 3);
        let mut skipped = Vec::new();
        let s = select_explained(&p, IP, 7, MAX_CANDIDATES, Some(&mut skipped)).unwrap();
        assert_eq!(s.rule, Rule::MaglevBounded);
        assert_eq!(s.candidates(), &[order[1], order[2], order[0]]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].to_string(), "over load bound: 9 open >= 8.75");
        // Under the bound, the key keeps its own backend (stickiness).
        let q = pool(&[1000, 1000, 1000], Balance::Maglev, Some(125));
        open(&q, order[0] as usize, 2);
        open(&q, order[1] as usize, 2);
        open(&q, order[2] as usize, 2);
        assert_eq!(select_hash(&q, IP, 7, 1).unwrap().candidates(), &[order[0]]);
    }

    #[test]
    fn least_conn_takes_the_lowest_load_per_weight_and_breaks_ties_by_the_hash_order() {
        let p = pool(&[1000, 1000, 2000], Balance::LeastConn, None);
        open(&p, 0, 3);
        open(&p, 1, 2);
        open(&p, 2, 5); // 5/2 = 2.5 per weight unit > 2
        assert_eq!(select_hash(&p, IP, 1, 1).unwrap().candidates(), &[1]);
        open(&p, 1, 1);
        open(&p, 2, 1); // all at 3 per weight unit (6 on weight 2): tied
        for h in [1u64, 2, 3, 99, 12345] {
            let first = p.table.as_ref().unwrap().lookup(h);
            let s = select_hash(&p, IP, h, 4).unwrap();
            assert_eq!(s.candidates()[0], first, "ties go to the hash's own backend");
            assert_eq!(s.rule, Rule::LeastConn);
        }
    }

    #[test]
    fn random_two_prefers_the_less_loaded_of_its_draws() {
        let p = pool(&[1000, 1000], Balance::RandomTwo, None);
        open(&p, 0, 50);
        let picks = (0..200)
            .filter(|_| select_hash(&p, IP, 5, 2).unwrap().candidates()[0] == 1)
            .count();
        // Backend 1 wins whenever it is drawn at all: both draws land on 0
        // a quarter of the time, and the redraw too half of that: 7 in 8.
        assert!(picks > 150, "{picks} of 200");
    }

    #[test]
    fn the_connects_in_flight_count_as_load() {
        let p = pool(&[1000, 1000], Balance::LeastConn, None);
        p.backends[0].connecting.opened.add(1);
        assert_eq!(select_hash(&p, IP, 3, 1).unwrap().candidates(), &[1]);
    }
}
