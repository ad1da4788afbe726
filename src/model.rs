//! The control plane's model: pools, backends and listeners as configured and
//! changed at runtime. It is the only writer of the routing snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, ListenerConfig, PoolConfig};
use crate::snapshot::{Backend, ListenerView, PoolSnapshot, Snapshot};
use crate::stats::ListenerStats;
use crate::worker::StopSignal;

/// A backend as the control plane tracks it.
pub struct BackendState {
    /// The data plane's view (address, counters, close flag).
    pub shared: Arc<Backend>,
    /// Configured weight.
    pub weight: u32,
}

/// A pool as the control plane tracks it.
pub struct PoolState {
    /// Settings.
    pub config: PoolConfig,
    /// Backends, in configured order.
    pub backends: Vec<BackendState>,
    /// The last published snapshot of this pool.
    pub published: Arc<PoolSnapshot>,
}

/// A listener as the control plane tracks it.
pub struct ListenerState {
    /// Slot id in the snapshot.
    pub slot: usize,
    /// Settings.
    pub config: Arc<ListenerConfig>,
    /// Counters.
    pub stats: Arc<ListenerStats>,
    /// Stops its accept loops.
    pub stop: Arc<StopSignal>,
}

/// Everything the control plane knows; builds snapshots.
pub struct Model {
    /// The config in force.
    pub config: Config,
    /// Worker count (fixed for the process's life).
    pub workers: usize,
    /// Pools by name, in config order.
    pub pools: Vec<PoolState>,
    /// Listeners, in config order.
    pub listeners: Vec<ListenerState>,
    next_slot: usize,
    generation: u64,
}

impl Model {
    /// A model of `config`, with no listeners yet (see [`Model::add_listener`]).
    pub fn new(config: Config, workers: usize) -> Model {
        let pools = config.pools.iter().map(|p| new_pool(p, workers, &HashMap::new())).collect();
        Model { config, workers, pools, listeners: Vec::new(), next_slot: 0, generation: 0 }
    }

    /// Registers a listener and returns its state (the caller binds sockets).
    pub fn add_listener(&mut self, config: ListenerConfig) -> &ListenerState {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.listeners.push(ListenerState {
            slot,
            config: Arc::new(config),
            stats: Arc::new(ListenerStats::new(self.workers)),
            stop: Arc::new(StopSignal::default()),
        });
        self.listeners.last().expect("just pushed")
    }

    /// Index of the pool named `name`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.config.name == name)
    }

    /// Builds the snapshot to publish.
    pub fn snapshot(&mut self) -> Snapshot {
        self.generation += 1;
        let mut listeners = vec![None; self.next_slot];
        for l in &self.listeners {
            if let Some(pool) = self.pool_index(&l.config.pool) {
                listeners[l.slot] = Some(ListenerView { config: l.config.clone(), pool, stats: l.stats.clone() });
            }
        }
        Snapshot {
            generation: self.generation,
            listeners,
            pools: self.pools.iter().map(|p| p.published.clone()).collect(),
        }
    }
}

/// Builds a pool's state, reusing the `Backend` (and so the counters) of any
/// address found in `existing`.
fn new_pool(config: &PoolConfig, workers: usize, existing: &HashMap<SocketAddr, Arc<Backend>>) -> PoolState {
    let backends: Vec<BackendState> = config
        .backends
        .iter()
        .map(|b| BackendState {
            shared: existing.get(&b.addr).cloned().unwrap_or_else(|| Arc::new(Backend::new(b.addr, workers))),
            weight: b.weight,
        })
        .collect();
    let published = Arc::new(build_pool(config, &backends, 1));
    PoolState { config: config.clone(), backends, published }
}

fn build_pool(config: &PoolConfig, backends: &[BackendState], generation: u64) -> PoolSnapshot {
    PoolSnapshot::build(
        &config.name,
        generation,
        config.table_size,
        backends.iter().map(|b| b.shared.clone()).collect(),
        backends.iter().map(|b| b.weight).collect(),
    )
}
