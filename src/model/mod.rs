//! The control plane's sans-io core: pools, backends and listeners as
//! configured and changed at runtime, and the only builder of snapshots.
//!
//! Every mutation takes `now` and returns one [`Effects`] (publish, close
//! check, listeners to start or stop, checks to run, log lines) and, for a
//! control command, a typed reply ([`crate::protocol`]). Nothing
//! here reads a clock, touches a socket or a file, or logs: the shell
//! (`crate::control`, `crate::server`) carries the effects out. Check
//! jitter comes from a seeded [`rng::Rng`], so a model replays exactly.
//!
//! The model does share memory with the data plane: per-backend atomics in
//! [`crate::snapshot::Backend`] (connection counts and consecutive connect
//! failures it reads, `closing`/`down` and the `slots` maximum it writes) and listener
//! counters. Those are inputs and outputs in memory, not I/O; tests set them
//! directly.
//!
//! One file per concept: [`state`] (what is tracked), [`rebuild`] (tables
//! from state, geo composition), [`commands`] (the `ctl` verbs), [`health`]
//! (checks due and their results), [`tick`] (drains, ejections, slow
//! start), [`reload`] (a new config applied), [`log`] (state-change lines),
//! [`effects`].

pub mod commands;
pub mod effects;
pub mod health;
mod log;
pub mod rebuild;
pub mod reload;
pub mod rng;
pub mod state;
pub mod tick;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{BackendConfig, CheckKind, Config, ListenerConfig, PoolConfig};
use crate::health::state::{ActiveCheck, AdminState, Outlier};
use crate::snapshot::{Backend, ListenerView, PoolSnapshot, Snapshot};
use crate::stats::ListenerStats;

pub use effects::{Effects, LogLine, StartListener};
pub use health::CheckJob;
pub use log::STATE_LOG_LINES_PER_SEC;
pub use rebuild::build_geo_tables;
pub use state::{BackendState, ListenerState, PoolState};

/// A control command's result: the typed reply and what the shell must do,
/// or the error shown to the operator, in which case nothing changed.
pub type CmdResult<T> = Result<(T, Effects), String>;

/// Everything the control plane knows; builds snapshots.
pub struct Model {
    /// The config in force.
    pub config: Config,
    /// Worker count (fixed for the process's life).
    pub workers: usize,
    /// Pools, in config order (retired ones last).
    pub pools: Vec<PoolState>,
    /// Listeners, in config order (retired ones last).
    pub listeners: Vec<ListenerState>,
    /// Successful config loads (1 = the file at start).
    pub config_generation: u64,
    next_slot: usize,
    next_epoch: u64,
    generation: u64,
    log_cap: log::LogCap,
    rng: rng::Rng,
    /// Checks by due time, so that finding the few backends due now does
    /// not mean reading every backend every scan (10,000 backends at a
    /// 20 ms scan was 500,000 reads a second). See [`Model::due_checks`].
    check_queue: std::collections::BinaryHeap<std::cmp::Reverse<health::DueCheck>>,
    full_scan_at: Instant,
}

impl Model {
    /// A model of `config` with its listeners registered (the effects ask
    /// the shell to start them, on sockets it bound before, and to publish
    /// the first snapshot). `seed` feeds the check jitter.
    pub fn new(config: Config, workers: usize, now: Instant, seed: u64) -> (Model, Effects) {
        let mut model = Model {
            config: config.clone(),
            workers,
            pools: Vec::new(),
            listeners: Vec::new(),
            config_generation: 1,
            next_slot: 0,
            next_epoch: 0,
            generation: 0,
            log_cap: log::LogCap::new(now),
            rng: rng::Rng::new(seed),
            check_queue: std::collections::BinaryHeap::new(),
            full_scan_at: now,
        };
        let mut fx = Effects::default();
        for p in &config.pools {
            let pool = model.new_pool(p, now);
            model.pools.push(pool);
        }
        for i in 0..model.pools.len() {
            model.rebuild_into(i, now, &mut fx);
        }
        for l in &config.listeners {
            model.add_listener(l.clone(), &mut fx);
        }
        fx.publish = true;
        (model, fx)
    }

    /// A pool's state before its first rebuild (an empty table).
    fn new_pool(&mut self, config: &PoolConfig, now: Instant) -> PoolState {
        let backends = config
            .backends
            .iter()
            .map(|b| self.new_backend(config, b.clone(), now))
            .collect();
        PoolState {
            config: config.clone(),
            backends,
            published: Arc::new(
                PoolSnapshot::build(&config.name, 0, config.table_size, Vec::new(), Vec::new())
                    .expect("an empty pool has a (missing) table"),
            ),
            panic: false,
            next_slow_start_step: None,
            retired: false,
            dirty: false,
            build_failures: 0,
            pending_log: Vec::new(),
        }
    }

    /// A new incarnation of a backend of `pool`, its first check due
    /// within the pool's jitter (at most an interval) from `now`.
    fn new_backend(&mut self, pool: &PoolConfig, config: BackendConfig, now: Instant) -> BackendState {
        self.next_epoch += 1;
        let hc = &pool.health_check;
        let initially_up = hc.kind == CheckKind::None || hc.initially_up;
        let first_check = self
            .rng
            .jitter(hc.interval.min(hc.jitter.max(Duration::from_millis(1))));
        BackendState {
            shared: Arc::new(Backend::new(config.addr, self.workers)),
            config,
            admin: AdminState::Enabled,
            drain_deadline: None,
            remove_when_drained: false,
            active: ActiveCheck::new(hc.rise, hc.fall, initially_up),
            outlier: Outlier::new(),
            healthy_since: None,
            was_healthy: initially_up,
            next_check: now + first_check,
            check_in_flight: false,
            last_check: None,
            reason: if initially_up {
                "configured".into()
            } else {
                "initial_state = down".into()
            },
            epoch: self.next_epoch,
            sessions_closed: Default::default(),
        }
    }

    /// Registers a listener in a new slot and asks the shell to start it.
    fn add_listener(&mut self, config: ListenerConfig, fx: &mut Effects) {
        let slot = self.next_slot;
        self.next_slot += 1;
        let limits = Arc::new(crate::admission::limits::ListenerLimits::new(&config));
        let state = ListenerState {
            slot,
            config: Arc::new(config),
            stats: Arc::new(ListenerStats::new(self.workers)),
            limits,
            retire_deadline: None,
        };
        fx.start_listeners.push(StartListener {
            slot,
            config: state.config.clone(),
            stats: state.stats.clone(),
        });
        self.listeners.push(state);
    }

    /// Index of the live pool named `name`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.config.name == name && !p.retired)
    }

    /// The live listeners (not retired by a reload).
    pub fn live_listeners(&self) -> impl Iterator<Item = &ListenerState> {
        self.listeners.iter().filter(|l| l.retire_deadline.is_none())
    }

    /// Pool and backend index of `addr` in live pool `pool` (a backend
    /// leaving the pool is not found).
    fn find(&self, pool: &str, addr: &str) -> Result<(usize, usize), String> {
        let p = self
            .pool_index(pool)
            .ok_or_else(|| format!("no pool named \"{pool}\""))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("\"{addr}\" is not an ip:port address"))?;
        let b = self.pools[p]
            .backends
            .iter()
            .position(|b| b.config.addr == addr && !b.remove_when_drained)
            .ok_or_else(|| format!("pool \"{pool}\" has no backend {addr}"))?;
        Ok((p, b))
    }

    /// Builds the snapshot to publish (the shell stores it when
    /// [`Effects::publish`] says so).
    pub fn snapshot(&mut self) -> Snapshot {
        self.generation += 1;
        let mut listeners = vec![None; self.next_slot];
        for l in self.listeners.iter().filter(|l| l.retire_deadline.is_none()) {
            if let Some(pool) = self.pool_index(&l.config.pool) {
                listeners[l.slot] = Some(ListenerView {
                    config: l.config.clone(),
                    pool,
                    stats: l.stats.clone(),
                    limits: l.limits.clone(),
                });
            }
        }
        Snapshot {
            generation: self.generation,
            listeners,
            pools: self.pools.iter().map(|p| p.published.clone()).collect(),
        }
    }

    /// Snapshot generation last built.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}
