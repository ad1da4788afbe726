//! Pool tables from backend state: health plan (slow start, panic), geo
//! spill-over rows, one Maglev table each; dirty pools rebuilt once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{OnDown, OnUp};
use crate::health::state::{plan_tiers, AdminState, BackendView};
use crate::snapshot::PoolSnapshot;

use super::effects::Effects;
use super::Model;

impl Model {
    /// Rebuilds pool `i`'s table from its backends' admin and health state;
    /// the effects ask for a publish.
    ///
    /// Design choice (vs Sozu's "build over all, skip unhealthy at lookup"):
    /// the table is rebuilt from the usable set, as Envoy does. A lookup then
    /// stays one hash and one index with no per-lookup health check, and a
    /// backend that is down gets no slots, so connect retries are spent on
    /// live backends. The cost of a flapping backend lands on the control
    /// thread only (a build is ~1-3 ms for 100 backends at M = 65537),
    /// rise/fall damp flapping, and health changes are coalesced: at most
    /// one rebuild per pool per control tick (100 ms), however many backends
    /// changed; workers only ever load the finished table.
    pub fn rebuild(&mut self, i: usize, now: Instant) -> Effects {
        let mut fx = Effects::default();
        self.rebuild_into(i, now, &mut fx);
        fx
    }

    /// [`Model::rebuild`] into `fx`.
    pub(super) fn rebuild_into(&mut self, i: usize, now: Instant, fx: &mut Effects) {
        self.flush_state_log(i, now, fx);
        self.pools[i].dirty = false;
        fx.publish = true;
        let geo_cfg = &self.config.geo;
        let pool = &mut self.pools[i];
        let cfg = &pool.config;
        let mut next_step: Option<Instant> = None;
        let views: Vec<BackendView> = pool
            .backends
            .iter()
            .map(|b| {
                let (view, next) = b.view(cfg, now);
                if let Some(n) = next {
                    next_step = Some(next_step.map_or(n, |x: Instant| x.min(n)));
                }
                view
            })
            .collect();
        let backup: Vec<bool> = pool.backends.iter().map(|b| b.config.backup).collect();
        let tiers = plan_tiers(&views, &backup, cfg.panic_threshold);
        let backup_tier = tiers.backup_tier;
        let plan = tiers.plan;
        if backup_tier != pool.published.backup_tier {
            if backup_tier {
                fx.warn(format!(
                    "pool \"{}\": no primary backend is healthy; the backup backends take the connections",
                    cfg.name
                ));
            } else if pool.backends.iter().any(|b| b.config.backup) {
                fx.info(format!(
                    "pool \"{}\": a primary backend is usable again; the backups take no new connections",
                    cfg.name
                ));
            }
        }
        if plan.panic != pool.panic {
            if plan.panic {
                let healthy = views
                    .iter()
                    .filter(|v| v.healthy && v.admin == AdminState::Enabled)
                    .count();
                fx.warn(format!(
                    "pool \"{}\": panic mode: only {healthy} of {} enabled backends healthy (threshold {}%); balancing over all enabled backends",
                    cfg.name,
                    views.iter().filter(|v| v.admin == AdminState::Enabled).count(),
                    cfg.panic_threshold * 100.0
                ));
            } else {
                fx.info(format!(
                    "pool \"{}\": panic mode over: enough healthy weight again",
                    cfg.name
                ));
            }
        }
        pool.panic = plan.panic;
        for (b, v) in pool.backends.iter().zip(&views) {
            b.shared.down.store(!v.healthy && !plan.panic, Ordering::Relaxed);
            b.shared.slots.set_max(b.config.max_connections as usize);
            b.shared.backup.store(b.config.backup, Ordering::Relaxed);
        }
        close_sessions(
            cfg,
            &pool.published,
            &mut pool.backends,
            &views,
            &plan.weights,
            backup_tier,
            fx,
        );
        pool.next_slow_start_step = next_step;
        let generation = pool.published.generation + 1;
        let built = PoolSnapshot::build_with_geo(
            &cfg.name,
            generation,
            cfg.table_size,
            pool.backends.iter().map(|b| b.shared.clone()).collect(),
            plan.weights.clone(),
            || match &cfg.geo {
                // Backups have one table for every client region.
                Some(_) if backup_tier => Ok(None),
                Some(pool_geo) => {
                    let configs: Vec<&crate::config::BackendConfig> = pool.backends.iter().map(|b| &b.config).collect();
                    build_geo_tables(pool_geo, geo_cfg, &configs, &plan.weights, cfg.table_size).map(Some)
                }
                None => Ok(None),
            },
        );
        let snapshot = match built {
            Ok(mut s) => {
                s.balance = cfg.balance;
                s.hash_balance_factor = cfg.hash_balance_factor;
                s.backup_tier = backup_tier;
                s
            }
            Err(e) => {
                // A table that cannot be built is a bug upstream of it (the
                // model let in a state the validator should have refused).
                // Publishing no table would refuse every client of a pool
                // that may well have healthy backends: keep the last one.
                fx.log(
                    log::Level::Error,
                    format!(
                        "pool \"{}\": cannot build its table ({e}); keeping table generation {}",
                        cfg.name, pool.published.generation
                    ),
                );
                pool.build_failures += 1;
                return;
            }
        };
        if snapshot.table.is_none() && !pool.backends.is_empty() {
            fx.warn(format!(
                "pool \"{}\": no usable backend; new connections are refused",
                cfg.name
            ));
        }
        fx.log(
            log::Level::Debug,
            format!(
                "pool \"{}\": table generation {generation} built in {:?}",
                cfg.name, snapshot.build_time
            ),
        );
        pool.published = Arc::new(snapshot);
    }

    /// Rebuilds every pool marked dirty, once each; the effects ask for one
    /// publish for all of them (none when no pool was dirty).
    pub fn rebuild_dirty(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        for i in 0..self.pools.len() {
            if self.pools[i].dirty {
                fx.publish = true;
                if self.pools[i].retired {
                    self.flush_state_log(i, now, &mut fx);
                    self.pools[i].dirty = false;
                } else {
                    self.rebuild_into(i, now, &mut fx);
                }
            }
        }
        fx
    }

    /// Whether some pool waits for a rebuild.
    pub fn any_dirty(&self) -> bool {
        self.pools.iter().any(|p| p.dirty)
    }
}

/// The session rules of a pool at a rebuild, from the published table to
/// the `weights` about to be published: `on_down = "close"` closes the
/// connections of every backend that leaves the table because it is down,
/// ejected or disabled (not one that is drained: a drain keeps its
/// connections until its deadline); `on_up = "close_backups"` closes the
/// backups' connections when the primaries take over again. Both set the
/// backend's `closing` flag and ask the workers to check (`check_close`);
/// a backend back in the table has the flag cleared, so its new
/// connections are not closed by a later check.
fn close_sessions(
    cfg: &crate::config::PoolConfig,
    prev: &PoolSnapshot,
    backends: &mut [super::state::BackendState],
    views: &[BackendView],
    weights: &[u32],
    backup_tier: bool,
    fx: &mut Effects,
) {
    let rules = cfg.on_down == OnDown::Close || cfg.on_up == OnUp::CloseBackups;
    // Backends are matched to the published table by identity: adds and
    // removals since then shift the indices. Only pools with a rule pay.
    let prev_weight: std::collections::HashMap<*const crate::snapshot::Backend, u32> = if rules {
        prev.backends
            .iter()
            .zip(&prev.weights)
            .map(|(b, &w)| (Arc::as_ptr(b), w))
            .collect()
    } else {
        Default::default()
    };
    let primary_back = prev.backup_tier && !backup_tier && weights.iter().any(|&w| w > 0);
    for ((b, v), &w) in backends.iter_mut().zip(views).zip(weights) {
        if w > 0 {
            if b.shared.closing.load(Ordering::SeqCst) && b.admin == AdminState::Enabled {
                b.shared.closing.store(false, Ordering::SeqCst);
            }
            continue;
        }
        if !rules {
            continue;
        }
        let was_in = prev_weight.get(&Arc::as_ptr(&b.shared)).is_some_and(|&pw| pw > 0);
        let went_down = cfg.on_down == OnDown::Close
            && was_in
            && (!v.healthy || v.admin == AdminState::Disabled)
            && v.admin != AdminState::Draining;
        let backup_closed = cfg.on_up == OnUp::CloseBackups && primary_back && b.config.backup;
        if !(went_down || backup_closed) || b.shared.closing.load(Ordering::SeqCst) {
            continue;
        }
        let open = b.open_connections();
        b.shared.closing.store(true, Ordering::SeqCst);
        fx.check_close = true;
        if went_down {
            b.sessions_closed.down += open;
            fx.warn(format!(
                "pool \"{}\": backend {} is down: closing its {open} open connection(s) (on_down = \"close\")",
                cfg.name, b.config.addr
            ));
        } else {
            b.sessions_closed.primary_up += open;
            fx.info(format!(
                "pool \"{}\": a primary is back: closing {open} open connection(s) on backup {} (on_up = \"close_backups\")",
                cfg.name, b.config.addr
            ));
        }
    }
}

/// Builds a geo pool's tables: one per distinct multiplier row (client
/// regions without a row share the `default` row's table), each from the
/// spill-over weights of `crate::geo::effective_weights`, then scaled by the
/// health plan (slow start, panic) so geo and health compose.
pub fn build_geo_tables(
    pool_geo: &crate::config::PoolGeo,
    geo_cfg: &crate::config::GeoConfig,
    backends: &[&crate::config::BackendConfig],
    plan: &[u32],
    table_size: usize,
) -> Result<crate::snapshot::GeoTables, crate::maglev::MaglevError> {
    use crate::geo::{effective_weights, GeoBackend, RegionId, RegionNames};
    let inputs: Vec<GeoBackend> = backends
        .iter()
        .zip(plan)
        .map(|(b, w)| GeoBackend {
            region: b.region.unwrap_or(RegionNames::DEFAULT),
            weight: b.weight,
            usable: *w > 0,
        })
        .collect();
    let ids: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let mut rows: Vec<Option<&[(RegionId, u32)]>> = Vec::new();
    let mut tables = Vec::new();
    let mut weights = Vec::new();
    let mut by_region = Vec::new();
    for region in 0..geo_cfg.names.count() {
        let row = pool_geo.row(RegionId(region as u16));
        let index = match rows.iter().position(|r| *r == row) {
            Some(i) => i,
            None => {
                let eff = match row {
                    Some(m) => effective_weights(
                        &inputs,
                        |r| m.iter().find(|(id, _)| *id == r).map_or(0, |(_, x)| *x),
                        pool_geo.spill_threshold,
                    ),
                    None => effective_weights(&inputs, |_| 1, pool_geo.spill_threshold),
                };
                let scaled: Vec<u32> = eff
                    .iter()
                    .zip(plan)
                    .zip(backends)
                    .map(|((e, p), b)| crate::health::state::apply_plan_to_share(*e, *p, b.weight))
                    .collect();
                let pairs: Vec<(&str, u32)> = ids.iter().map(|s| s.as_str()).zip(scaled.iter().copied()).collect();
                tables.push(crate::snapshot::build_or_none(&pairs, table_size)?);
                weights.push(scaled);
                rows.push(row);
                rows.len() - 1
            }
        };
        by_region.push(index as u16);
    }
    Ok(crate::snapshot::GeoTables {
        map: geo_cfg.map.clone(),
        names: geo_cfg.names.clone(),
        tables,
        by_region,
        weights,
    })
}
