//! The routing snapshot: one immutable value that workers load per connection.
//!
//! The control plane builds a new [`Snapshot`] off the hot path on every change
//! (config, control command, health) and publishes it with one atomic swap.
//! Workers only ever read it; they never see a half-applied change.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::admission::ConnLimit;
use crate::config::Balance;
use crate::config::ListenerConfig;
use crate::maglev::MaglevTable;
use crate::stats::{BackendStats, Gauge, ListenerStats};

/// A backend as the data plane sees it. One `Backend` lives as long as its
/// address stays in its pool, across table rebuilds and reloads, so its
/// counters are continuous.
#[derive(Debug)]
pub struct Backend {
    /// Address connected to.
    pub addr: SocketAddr,
    /// Traffic counters.
    pub stats: BackendStats,
    /// Set when its open connections must be closed (drain timeout passed,
    /// removed); workers check it when woken by a close command.
    pub closing: AtomicBool,
    /// Set while health checks say it is down (outside panic mode): UDP
    /// flows on it re-pick on their next datagram.
    pub down: AtomicBool,
    /// `max_connections` across workers: the same counter as a listener's
    /// limit ([`ConnLimit`]), its maximum set by the control plane, where
    /// 0 means no limit and nothing is counted (a shared counter is the
    /// only exact way to enforce a cross-worker maximum, and an unlimited
    /// backend should not pay for one).
    pub slots: ConnLimit,
    /// Connect failures in a row, across workers. Reset on success only when
    /// non-zero, so a healthy backend's line is only read, never written.
    pub consecutive_failures: AtomicU32,
    /// TCP connects in flight to it, counted only by pools whose balance
    /// reads loads (least_conn, random_two, bounded Maglev): sharded per
    /// worker like every counter, so counting never shares a written line.
    pub connecting: Gauge,
    /// A backup backend (`backup = true`), for `ctl backends` and the
    /// `on_up = "close_backups"` rule.
    pub backup: AtomicBool,
}

impl Backend {
    /// A fresh backend with zeroed counters.
    pub fn new(addr: SocketAddr, workers: usize) -> Self {
        Backend {
            addr,
            stats: BackendStats::new(workers),
            closing: AtomicBool::new(false),
            down: AtomicBool::new(false),
            slots: ConnLimit::new(0),
            consecutive_failures: AtomicU32::new(0),
            connecting: Gauge::new(workers),
            backup: AtomicBool::new(false),
        }
    }

    /// Its load as balancing sees it: open connections and flows, across
    /// workers, plus TCP connects in flight (in pools that count them).
    /// Sums the per-worker shards: a read, never a write.
    #[inline]
    pub fn load(&self) -> u64 {
        self.stats.conns.current() + self.connecting.current()
    }

    /// Records a successful connect.
    #[inline]
    pub fn connect_succeeded(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed connect; returns the failures in a row so far.
    #[inline]
    pub fn connect_failed(&self) -> u32 {
        self.stats.connect_failures.inc();
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes a connection slot; `None` when it is at `max_connections`. Returns
    /// `Some(counted)`: whether [`Backend::release_slot`] must be called.
    #[inline]
    pub fn try_take_slot(&self) -> Option<bool> {
        if self.slots.max() == 0 {
            return Some(false);
        }
        self.slots.try_acquire().then_some(true)
    }

    /// Gives back a slot taken with [`Backend::try_take_slot`] (`Some(true)`).
    #[inline]
    pub fn release_slot(&self) {
        self.slots.release();
    }

    /// Whether a new TCP connection would find it at `max_connections`.
    pub fn is_full(&self) -> bool {
        let max = self.slots.max();
        max > 0 && self.slots.current() >= max
    }

    /// Whether health checks say it is down.
    #[inline]
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Whether its connections must close now.
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

/// One pool's published state: backends, the weights the table was built
/// from, and the table itself.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// Pool name.
    pub name: String,
    /// Increases on every rebuild of this pool.
    pub generation: u64,
    /// Every backend of the pool (the table indexes into this).
    pub backends: Vec<Arc<Backend>>,
    /// Effective weight of each backend in the table (0 = not in it).
    pub weights: Vec<u32>,
    /// The Maglev table; `None` when no backend is usable (fail fast).
    pub table: Option<MaglevTable>,
    /// How long the table(s) took to build.
    pub build_time: Duration,
    /// Per-client-region tables of a geo pool (none while the backup tier
    /// serves: backups have one table for every client).
    pub geo: Option<GeoTables>,
    /// How a backend is picked from the table's backends.
    pub balance: Balance,
    /// Maglev bounded loads, percent (`None` = off).
    pub hash_balance_factor: Option<u32>,
    /// Whether the table is the backups' (no primary is usable).
    pub backup_tier: bool,
}

/// The tables of a geo pool: one per distinct multiplier row.
#[derive(Debug)]
pub struct GeoTables {
    /// Client address → region.
    pub map: Arc<crate::geo::RegionMap>,
    /// Region names (for `ctl route`).
    pub names: Arc<crate::geo::RegionNames>,
    /// The distinct tables (`None` = nothing usable for those regions).
    pub tables: Vec<Option<MaglevTable>>,
    /// Client region id → index into `tables`.
    pub by_region: Vec<u16>,
    /// Effective weights of each table, for `ctl route`.
    pub weights: Vec<Vec<u32>>,
}

impl PoolSnapshot {
    /// The table for a client at `ip`, and its region when the pool is a geo pool.
    #[inline]
    pub fn table_for(&self, ip: std::net::IpAddr) -> (Option<&MaglevTable>, Option<crate::geo::RegionId>) {
        match &self.geo {
            None => (self.table.as_ref(), None),
            Some(g) => {
                let region = g.map.lookup(ip);
                let t = g.by_region.get(region.0 as usize).copied().unwrap_or(0);
                (g.tables.get(t as usize).and_then(|t| t.as_ref()), Some(region))
            }
        }
    }

    /// [`PoolSnapshot::table_for`] with the effective weights that table was
    /// built from (indexed like `backends`).
    #[inline]
    pub fn table_and_weights(
        &self,
        ip: std::net::IpAddr,
    ) -> (Option<&MaglevTable>, Option<crate::geo::RegionId>, &[u32]) {
        match &self.geo {
            None => (self.table.as_ref(), None, &self.weights),
            Some(g) => {
                let region = g.map.lookup(ip);
                let t = g.by_region.get(region.0 as usize).copied().unwrap_or(0) as usize;
                (
                    g.tables.get(t).and_then(|t| t.as_ref()),
                    Some(region),
                    g.weights.get(t).map_or(&[][..], |w| &w[..]),
                )
            }
        }
    }

    /// Whether new connections must count their connect in flight
    /// ([`Backend::connecting`]): only when the balance reads loads.
    #[inline]
    pub fn counts_load(&self) -> bool {
        self.balance != Balance::Maglev || self.hash_balance_factor.is_some()
    }
}

impl PoolSnapshot {
    /// Builds the table from `backends` and their effective weights.
    /// Backends with weight 0 get no slots; all zero gives no table (the
    /// normal "nothing usable" case: fail fast). Any other failure (two
    /// backends with one identity, a table too small) is an error, so the
    /// caller can keep the table it has rather than publish none.
    pub fn build(
        name: &str,
        generation: u64,
        table_size: usize,
        backends: Vec<Arc<Backend>>,
        weights: Vec<u32>,
    ) -> Result<PoolSnapshot, crate::maglev::MaglevError> {
        Self::build_with_geo(name, generation, table_size, backends, weights, || Ok(None))
    }

    /// [`PoolSnapshot::build`], plus the geo tables `geo` builds. The build
    /// time (shown by `ctl stats`) covers both; it is a measurement only,
    /// never an input to a decision, which is why the model may call this.
    pub fn build_with_geo(
        name: &str,
        generation: u64,
        table_size: usize,
        backends: Vec<Arc<Backend>>,
        weights: Vec<u32>,
        geo: impl FnOnce() -> Result<Option<GeoTables>, crate::maglev::MaglevError>,
    ) -> Result<PoolSnapshot, crate::maglev::MaglevError> {
        let start = std::time::Instant::now();
        // The identity hashed is the address text: stable across processes and
        // machines, so every ringlb instance builds the same table.
        let ids: Vec<(String, u32)> = backends
            .iter()
            .zip(&weights)
            .map(|(b, w)| (b.addr.to_string(), *w))
            .collect();
        let table = build_or_none(&ids, table_size)?;
        let geo = geo()?;
        Ok(PoolSnapshot {
            name: name.to_string(),
            generation,
            backends,
            weights,
            table,
            build_time: start.elapsed(),
            geo,
            balance: Balance::Maglev,
            hash_balance_factor: None,
            backup_tier: false,
        })
    }
}

/// A Maglev table of `ids`, `None` when no weight is left (fail fast), or the
/// build's error.
pub fn build_or_none<K: AsRef<[u8]>>(
    ids: &[(K, u32)],
    table_size: usize,
) -> Result<Option<MaglevTable>, crate::maglev::MaglevError> {
    match MaglevTable::build(ids, table_size) {
        Ok(t) => Ok(Some(t)),
        Err(crate::maglev::MaglevError::NoWeight) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A listener as workers see it.
#[derive(Debug, Clone)]
pub struct ListenerView {
    /// Its settings.
    pub config: Arc<ListenerConfig>,
    /// Index of its pool in [`Snapshot::pools`].
    pub pool: usize,
    /// Its counters (kept across reloads while the name and bind stay).
    pub stats: Arc<ListenerStats>,
    /// Its admission state.
    pub limits: Arc<crate::admission::limits::ListenerLimits>,
}

/// Everything a worker needs to route a new connection.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases on every publish.
    pub generation: u64,
    /// Listeners by slot id (slots are never reused while ringlb runs, so a
    /// worker's accept loop keeps its slot across reloads).
    pub listeners: Vec<Option<ListenerView>>,
    /// Pools.
    pub pools: Vec<Arc<PoolSnapshot>>,
}

impl Snapshot {
    /// The listener in `slot`, if it still exists.
    #[inline]
    pub fn listener(&self, slot: usize) -> Option<&ListenerView> {
        self.listeners.get(slot).and_then(|l| l.as_ref())
    }
}
