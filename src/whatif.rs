//! `what-if`: how much of a pool's key space a change would move, and from which backend to which, computed with the workers' table code.
//!
//! A pool's tables are built here exactly as the control plane builds them
//! for the workers ([`build_pool`]: `health::state::plan_tiers`, then
//! `PoolSnapshot::build` and `model::build_geo_tables`), once for the pool
//! as it is and once as the change would leave it. Every flow hash maps to
//! slot `hash % size`, so with equal table sizes the fraction of the key
//! space that moves is exactly the fraction of slots whose backend changes.
//! With different (prime, hence coprime) sizes a hash's two slots are
//! independent (Chinese remainder theorem), so the fraction from backend
//! `x` to `y` is `slots_before(x) · slots_after(y) / (size_before · size_after)`.
//! Nothing here changes any state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{BackendConfig, Config, GeoConfig, PoolConfig};
use crate::health::state::{plan_tiers, AdminState, BackendView};
use crate::maglev::{MaglevError, MaglevTable};
use crate::protocol::{Move, OldNew, PoolMoves, WhatIfReply};
use crate::snapshot::{Backend, PoolSnapshot};

/// Most from→to entries listed per table; the rest are summed up as omitted.
pub const MAX_MOVES_LISTED: usize = 32;

/// A change to a pool, as `ctl what-if` names it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `remove ADDR`.
    Remove(SocketAddr),
    /// `add ADDR [--weight W]`.
    Add(BackendConfig),
    /// `weight ADDR W`.
    Weight(SocketAddr, u32),
}

/// One backend as the table plan sees it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its settings (address, weight, region).
    pub config: BackendConfig,
    /// Health, operator state, slow start.
    pub view: BackendView,
}

impl Member {
    /// A backend that is enabled, healthy and at full weight (the offline view of a file).
    pub fn healthy(config: BackendConfig) -> Member {
        let view = BackendView {
            weight: config.weight,
            admin: AdminState::Enabled,
            healthy: true,
            slow_start_permille: crate::health::state::PERMILLE_FULL,
        };
        Member { config, view }
    }
}

/// Builds a pool's tables from `members` the way the control plane does for the workers.
pub fn build_pool(cfg: &PoolConfig, geo: &GeoConfig, members: &[Member]) -> Result<PoolSnapshot, MaglevError> {
    let views: Vec<BackendView> = members.iter().map(|m| m.view).collect();
    let backup: Vec<bool> = members.iter().map(|m| m.config.backup).collect();
    let tiers = plan_tiers(&views, &backup, cfg.panic_threshold);
    let plan = tiers.plan;
    let backends = members
        .iter()
        .map(|m| Arc::new(Backend::new(m.config.addr, 1)))
        .collect();
    let mut snapshot = PoolSnapshot::build(&cfg.name, 0, cfg.table_size, backends, plan.weights.clone())?;
    snapshot.backup_tier = tiers.backup_tier;
    // As the model does: the backups' table serves every client region.
    if let Some(pool_geo) = cfg.geo.as_ref().filter(|_| !tiers.backup_tier) {
        let configs: Vec<&BackendConfig> = members.iter().map(|m| &m.config).collect();
        snapshot.geo = Some(crate::model::build_geo_tables(
            pool_geo,
            geo,
            &configs,
            &plan.weights,
            cfg.table_size,
        )?);
    }
    Ok(snapshot)
}

/// `members` with `change` applied; an error names what does not fit.
pub fn apply(members: &[Member], change: &Change, pool: &str) -> Result<Vec<Member>, String> {
    let mut out = members.to_vec();
    let find = |addr: &SocketAddr| {
        out.iter()
            .position(|m| m.config.addr == *addr)
            .ok_or_else(|| format!("pool \"{pool}\" has no backend {addr}"))
    };
    match change {
        Change::Remove(addr) => {
            let i = find(addr)?;
            out.remove(i);
        }
        Change::Weight(addr, w) => {
            let i = find(addr)?;
            out[i].config.weight = *w;
            out[i].view.weight = *w;
        }
        Change::Add(config) => {
            if out.iter().any(|m| m.config.addr == config.addr) {
                return Err(format!("pool \"{pool}\" already has backend {}", config.addr));
            }
            // Taken as up: the table it will have once its checks pass
            // (with `initial_state = "down"` that is a little later).
            out.push(Member::healthy(config.clone()));
        }
    }
    Ok(out)
}

/// How one table's key space moves.
#[derive(Debug, Clone, PartialEq)]
pub struct TableMoves {
    /// The client region (geo pools), by name.
    pub region: Option<String>,
    /// Fraction of the key space whose backend changes, 0..=1.
    pub moved: f64,
    /// (from, to, fraction), largest first; `None` = no usable backend.
    pub moves: Vec<(Option<SocketAddr>, Option<SocketAddr>, f64)>,
}

/// Owner of each slot as an address (`None` everywhere when there is no table).
fn owners(pool: &PoolSnapshot, table: Option<&MaglevTable>) -> (usize, Vec<Option<SocketAddr>>) {
    match table {
        None => (1, vec![None]),
        Some(t) => (
            t.size(),
            t.slots()
                .iter()
                .map(|&i| pool.backends.get(i as usize).map(|b| b.addr))
                .collect(),
        ),
    }
}

/// The key space moved between two tables (see the module docs for the method).
pub fn compare_tables(
    before: (&PoolSnapshot, Option<&MaglevTable>),
    after: (&PoolSnapshot, Option<&MaglevTable>),
    region: Option<String>,
) -> TableMoves {
    let (mb, ob) = owners(before.0, before.1);
    let (ma, oa) = owners(after.0, after.1);
    let mut pairs: HashMap<(Option<SocketAddr>, Option<SocketAddr>), u64> = HashMap::new();
    let total = if mb == ma {
        for (x, y) in ob.iter().zip(&oa) {
            if x != y {
                *pairs.entry((*x, *y)).or_default() += 1;
            }
        }
        mb as f64
    } else {
        let count = |o: &[Option<SocketAddr>]| {
            let mut c: HashMap<Option<SocketAddr>, u64> = HashMap::new();
            for x in o {
                *c.entry(*x).or_default() += 1;
            }
            c
        };
        let (cb, ca) = (count(&ob), count(&oa));
        for (x, nx) in &cb {
            for (y, ny) in &ca {
                if x != y {
                    *pairs.entry((*x, *y)).or_default() += nx * ny;
                }
            }
        }
        mb as f64 * ma as f64
    };
    let moved_slots: u64 = pairs.values().sum();
    let mut moves: Vec<_> = pairs.into_iter().map(|((x, y), n)| (x, y, n as f64 / total)).collect();
    moves.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| (a.0, a.1).cmp(&(b.0, b.1))));
    TableMoves {
        region,
        moved: moved_slots as f64 / total,
        moves,
    }
}

/// The table a client region `name` uses in `pool` (`default`'s for a name the pool's config lacks).
fn region_table<'a>(pool: &'a PoolSnapshot, name: &str) -> Option<&'a MaglevTable> {
    match &pool.geo {
        None => pool.table.as_ref(),
        Some(g) => {
            let id = g.names.id(name).unwrap_or(crate::geo::RegionNames::DEFAULT);
            let t = g.by_region.get(id.0 as usize).copied().unwrap_or(0) as usize;
            g.tables.get(t).and_then(Option::as_ref)
        }
    }
}

/// Every table of the pool compared: one for a plain pool, one per client region (by name) for a geo pool.
pub fn compare_pools(before: &PoolSnapshot, after: &PoolSnapshot) -> Vec<TableMoves> {
    if before.geo.is_none() && after.geo.is_none() {
        return vec![compare_tables(
            (before, before.table.as_ref()),
            (after, after.table.as_ref()),
            None,
        )];
    }
    let mut names: Vec<String> = Vec::new();
    for p in [before, after] {
        if let Some(g) = &p.geo {
            names.extend(g.names.iter().map(|(_, n)| n.to_string()));
        }
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            compare_tables(
                (before, region_table(before, &n)),
                (after, region_table(after, &n)),
                Some(n),
            )
        })
        .collect()
}

/// The reply for one pool: its tables' moves, the largest
/// [`MAX_MOVES_LISTED`] of each listed.
pub fn report(pool: &str, tables: &[TableMoves]) -> PoolMoves {
    let addr = |a: &Option<SocketAddr>| a.map_or_else(|| "(none)".to_string(), |a| a.to_string());
    PoolMoves {
        pool: pool.to_string(),
        note: None,
        table_size: None,
        key_space: tables
            .iter()
            .map(|t| crate::protocol::TableMoves {
                region: t.region.clone(),
                moved_fraction: round(t.moved),
                moves: t
                    .moves
                    .iter()
                    .take(MAX_MOVES_LISTED)
                    .map(|(x, y, f)| Move {
                        from: addr(x),
                        to: addr(y),
                        fraction: round(*f),
                    })
                    .collect(),
                moves_omitted: t.moves.len().saturating_sub(MAX_MOVES_LISTED),
            })
            .collect(),
    }
}

/// Rounded to 1e-6 so the JSON reads 0.2, not 0.19999999999999998.
fn round(f: f64) -> f64 {
    (f * 1e6).round() / 1e6
}

/// A live what-if, gathered from the model (under its lock, cheap) and
/// computed later without it: the two builds take ~25 ms for 1,000 backends
/// and ~200 ms for a geo pool of 11 tables, which the control plane runs
/// off its thread (`spawn_blocking`).
pub struct Prepared {
    pool: PoolConfig,
    geo: GeoConfig,
    members: Vec<Member>,
    after: Vec<Member>,
    change: Change,
    udp_flows: u64,
}

/// Gathers `ctl what-if` on the live model: the pool as its backends are now
/// (health, drains, slow start) and as `change` would leave it, and the UDP
/// flows that would have to re-pick (those on a removed backend: a flow
/// keeps its backend while it is up, whatever the table says).
pub fn prepare(model: &crate::model::Model, pool: &str, change: &Change, now: Instant) -> Result<Prepared, String> {
    let p = model
        .pools
        .iter()
        .find(|p| !p.retired && p.config.name == pool)
        .ok_or_else(|| format!("no pool named \"{pool}\""))?;
    // Backends already leaving the pool are out of its table and stay out.
    let members: Vec<Member> = p
        .backends
        .iter()
        .filter(|b| !b.remove_when_drained)
        .map(|b| Member {
            config: b.config.clone(),
            view: b.view(&p.config, now).0,
        })
        .collect();
    let after = apply(&members, change, pool)?;
    let udp_flows = match change {
        Change::Remove(addr) => p
            .backends
            .iter()
            .filter(|b| b.config.addr == *addr)
            .map(|b| b.shared.stats.udp_flows.current())
            .sum::<u64>(),
        _ => 0,
    };
    Ok(Prepared {
        pool: p.config.clone(),
        geo: model.config.geo.clone(),
        members,
        after,
        change: change.clone(),
        udp_flows,
    })
}

impl Prepared {
    /// Builds both versions of the pool's tables and compares them: the reply.
    pub fn compute(&self) -> Result<WhatIfReply, String> {
        let name = &self.pool.name;
        let build = |m: &[Member]| build_pool(&self.pool, &self.geo, m).map_err(|e| format!("pool \"{name}\": {e}"));
        let tables = compare_pools(&build(&self.members)?, &build(&self.after)?);
        Ok(WhatIfReply {
            pool: report(name, &tables),
            change: describe(&self.change),
            udp_flows_repick: self.udp_flows,
        })
    }
}

/// `ctl what-if` on the live model in one go ([`prepare`], then [`Prepared::compute`]).
pub fn live(model: &crate::model::Model, pool: &str, change: &Change, now: Instant) -> Result<WhatIfReply, String> {
    prepare(model, pool, change, now)?.compute()
}

/// The change in words, for the reply.
pub fn describe(change: &Change) -> String {
    match change {
        Change::Remove(a) => format!("remove {a}"),
        Change::Add(c) => format!("add {} --weight {}", c.addr, c.weight),
        Change::Weight(a, w) => format!("weight {a} {w}"),
    }
}

/// `ringlb what-if -c OLD -c NEW`: every pool of either file, each backend
/// taken as healthy and enabled (the tables a fresh start of each file builds
/// once its checks pass).
pub fn offline(old: &Config, new: &Config) -> Result<Vec<PoolMoves>, String> {
    let mut names: Vec<&str> = old.pools.iter().chain(&new.pools).map(|p| p.name.as_str()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let side = |c: &Config| -> Result<Option<PoolSnapshot>, String> {
            let Some(p) = c.pools.iter().find(|p| p.name == name) else {
                return Ok(None);
            };
            let members: Vec<Member> = p.backends.iter().cloned().map(Member::healthy).collect();
            build_pool(p, &c.geo, &members)
                .map(Some)
                .map_err(|e| format!("pool \"{name}\": {e}"))
        };
        let (b, a) = (side(old)?, side(new)?);
        let only = |note: &str| PoolMoves {
            pool: name.to_string(),
            note: Some(note.to_string()),
            table_size: None,
            key_space: Vec::new(),
        };
        out.push(match (&b, &a) {
            (Some(b), Some(a)) => {
                let size = |p: &PoolSnapshot| p.table.as_ref().map_or(0, MaglevTable::size);
                PoolMoves {
                    table_size: Some(OldNew {
                        old: size(b),
                        new: size(a),
                    }),
                    ..report(name, &compare_pools(b, a))
                }
            }
            (None, _) => only("only in the new file: all its clients are new"),
            (_, None) => only("only in the old file: all its clients lose their pool"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashKey;

    fn backend(addr: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            addr: addr.parse().unwrap(),
            weight,
            check_addr: None,
            max_connections: 0,
            region: None,
            backup: false,
        }
    }

    fn pool_cfg(size: usize) -> PoolConfig {
        let text = format!(
            "[[listener]]\nname=\"l\"\nbind=\"127.0.0.1:1\"\npool=\"p\"\n[[pool]]\nname=\"p\"\ntable_size={size}\n[[pool.backend]]\naddr=\"10.0.0.1:80\"\n"
        );
        Config::parse(&text, std::path::Path::new("t.toml")).unwrap().pools[0].clone()
    }

    fn members(list: &[(&str, u32)]) -> Vec<Member> {
        list.iter().map(|(a, w)| Member::healthy(backend(a, *w))).collect()
    }

    /// Brute force over the key space: every slot index as a flow hash,
    /// through the workers' own lookup.
    fn brute(
        before: &PoolSnapshot,
        after: &PoolSnapshot,
        hashes: u64,
    ) -> (u64, HashMap<(SocketAddr, SocketAddr), u64>) {
        let (tb, ta) = (before.table.as_ref().unwrap(), after.table.as_ref().unwrap());
        let mut moved = 0;
        let mut m = HashMap::new();
        for h in 0..hashes {
            let x = before.backends[tb.lookup(h) as usize].addr;
            let y = after.backends[ta.lookup(h) as usize].addr;
            if x != y {
                moved += 1;
                *m.entry((x, y)).or_default() += 1;
            }
        }
        (moved, m)
    }

    #[test]
    fn fractions_match_a_brute_force_count_over_the_table() {
        let cfg = pool_cfg(65537);
        let geo = GeoConfig::default();
        let base = members(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 2),
            ("10.0.0.4:80", 1),
        ]);
        let changes = [
            Change::Add(backend("10.0.0.5:80", 1)),
            Change::Remove("10.0.0.3:80".parse().unwrap()),
            Change::Weight("10.0.0.1:80".parse().unwrap(), 3),
        ];
        let before = build_pool(&cfg, &geo, &base).unwrap();
        for change in &changes {
            let after = build_pool(&cfg, &geo, &apply(&base, change, "p").unwrap()).unwrap();
            let t = &compare_pools(&before, &after)[0];
            let (moved, matrix) = brute(&before, &after, 65537);
            assert_eq!(t.moved, moved as f64 / 65537.0, "{change:?}");
            assert_eq!(t.moves.len(), matrix.len());
            for (x, y, f) in &t.moves {
                assert_eq!(*f, matrix[&(x.unwrap(), y.unwrap())] as f64 / 65537.0);
            }
        }
        // Adding a fifth backend of weight 1 to weights 1+1+2+1 moves about 1/6 of the
        // keys, nearly all onto the new backend (Maglev's disruption is near minimal,
        // not minimal: a few slots change hands between the old backends too).
        let after = build_pool(&cfg, &geo, &apply(&base, &changes[0], "p").unwrap()).unwrap();
        let t = &compare_pools(&before, &after)[0];
        assert!((t.moved - 1.0 / 6.0).abs() < 0.03, "{}", t.moved);
        let new: SocketAddr = "10.0.0.5:80".parse().unwrap();
        let onto_new: f64 = t.moves.iter().filter(|m| m.1 == Some(new)).map(|m| m.2).sum();
        assert!(onto_new / t.moved > 0.9, "{onto_new} of {}: {:?}", t.moved, t.moves);
    }

    #[test]
    fn different_table_sizes_match_a_brute_force_count_over_both() {
        let geo = GeoConfig::default();
        let base = members(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let before = build_pool(&pool_cfg(251), &geo, &base).unwrap();
        let after = build_pool(&pool_cfg(257), &geo, &base).unwrap();
        let t = &compare_pools(&before, &after)[0];
        // Every hash modulo 251 x 257 is one (slot, slot) pair, each pair once.
        let (moved, _) = brute(&before, &after, 251 * 257);
        assert_eq!(t.moved, moved as f64 / (251.0 * 257.0));
        assert!(t.moved > 0.6, "resizing reshuffles: {}", t.moved);
    }

    #[test]
    fn real_client_addresses_move_as_predicted() {
        // The selection function workers call, on 40,000 client addresses.
        let cfg = pool_cfg(65537);
        let geo = GeoConfig::default();
        let base = members(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 1),
            ("10.0.0.4:80", 1),
        ]);
        let change = Change::Remove("10.0.0.2:80".parse().unwrap());
        let before = build_pool(&cfg, &geo, &base).unwrap();
        let after = build_pool(&cfg, &geo, &apply(&base, &change, "p").unwrap()).unwrap();
        let predicted = compare_pools(&before, &after)[0].moved;
        let mut moved = 0;
        let n = 40_000u32;
        for i in 0..n {
            let client = SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 40000);
            let pick = |p: &PoolSnapshot| {
                let s = crate::conn::select(p, client, HashKey::SrcIp, 1).unwrap();
                p.backends[s.candidates()[0] as usize].addr
            };
            moved += u32::from(pick(&before) != pick(&after));
        }
        let measured = moved as f64 / n as f64;
        assert!((measured - predicted).abs() < 0.01, "{measured} vs {predicted}");
        assert!((predicted - 0.25).abs() < 0.01, "{predicted}");
    }

    #[test]
    fn unknown_backends_are_named() {
        let base = members(&[("10.0.0.1:80", 1)]);
        let e = apply(&base, &Change::Remove("10.0.0.9:80".parse().unwrap()), "p").unwrap_err();
        assert_eq!(e, "pool \"p\" has no backend 10.0.0.9:80");
        let e = apply(&base, &Change::Add(backend("10.0.0.1:80", 1)), "p").unwrap_err();
        assert!(e.contains("already has backend"));
    }
}
