//! The control plane's state of one backend, pool and listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{BackendConfig, ListenerConfig, PoolConfig};
use crate::health::state::{slow_start, ActiveCheck, AdminState, BackendView, Outlier, DEFAULT_SLOW_START_STEPS};
use crate::snapshot::{Backend, PoolSnapshot};
use crate::stats::ListenerStats;

use super::log::StateChange;

/// A backend as the control plane tracks it.
pub struct BackendState {
    /// The data plane's view (address, counters, close flag).
    pub shared: Arc<Backend>,
    /// Current settings (weight may come from `ctl weight`).
    pub config: BackendConfig,
    /// Operator intent.
    pub admin: AdminState,
    /// When a drained or disabled backend's remaining connections are closed.
    pub drain_deadline: Option<Instant>,
    /// Leave the pool once drained (`ctl remove`, or gone from the file).
    pub remove_when_drained: bool,
    /// Active check state (always up when the pool has no active checks).
    pub active: ActiveCheck,
    /// Passive check state.
    pub outlier: Outlier,
    /// When it last became healthy (slow start counts from here).
    pub healthy_since: Option<Instant>,
    /// Whether it was healthy at the last rebuild (to log changes once).
    pub was_healthy: bool,
    /// Next active check due.
    pub next_check: Instant,
    /// An active check is running.
    pub check_in_flight: bool,
    /// Last active check: passed (None: could not run in ringlb), latency, detail.
    pub last_check: Option<(Option<bool>, Duration, String)>,
    /// Why it last changed state, for `ctl backends`.
    pub reason: String,
    /// Identifies this incarnation (a removed and re-added address is a new one),
    /// so a late check result never lands on the wrong backend.
    pub epoch: u64,
    /// Connections closed by `on_down = "close"` (it went down) and by
    /// `on_up = "close_backups"` (a primary came back), for the metrics.
    pub sessions_closed: SessionsClosed,
}

/// Connections the pool's session rules closed on one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionsClosed {
    /// `on_down = "close"`: it went down with these open.
    pub down: u64,
    /// `on_up = "close_backups"`: a backup's, when a primary came back.
    pub primary_up: u64,
}

impl BackendState {
    /// Healthy by active and passive checks at `now`.
    pub fn healthy(&self, now: Instant) -> bool {
        self.active.is_up() && !self.outlier.is_ejected(now)
    }

    /// Takes a backend that is leaving its pool (removed, still draining)
    /// back into service with `config`: one entry per address, so its open
    /// connections and counters carry on, and the table never holds the
    /// same address twice (which it cannot build).
    pub(super) fn take_back(&mut self, config: BackendConfig, reason: &str, now: Instant) {
        self.config = config;
        self.remove_when_drained = false;
        self.admin = AdminState::Enabled;
        self.drain_deadline = None;
        self.shared.closing.store(false, Ordering::SeqCst);
        self.healthy_since = Some(now);
        self.reason = reason.into();
    }

    /// Starts draining: out of the table now, remaining connections closed
    /// at the deadline (an earlier deadline is kept).
    pub(super) fn start_draining(&mut self, admin: AdminState, timeout: Duration, now: Instant) {
        self.admin = admin;
        self.drain_deadline.get_or_insert(now + timeout);
    }

    /// What the table plan sees of it at `now` (health, operator state,
    /// slow-start share), and when its slow-start share next changes.
    /// `rebuild` and `ctl what-if` both use it.
    pub fn view(&self, cfg: &PoolConfig, now: Instant) -> (BackendView, Option<Instant>) {
        let healthy = self.healthy(now);
        let mut permille = 1000;
        let mut next_step = None;
        if healthy && !cfg.slow_start.is_zero() {
            if let Some(since) = self.healthy_since {
                let (p, next) = slow_start(since, now, cfg.slow_start, DEFAULT_SLOW_START_STEPS);
                permille = p;
                next_step = next;
            }
        }
        let view = BackendView {
            weight: self.config.weight,
            admin: self.admin,
            healthy,
            slow_start_permille: permille,
        };
        (view, next_step)
    }

    /// The state shown to operators.
    pub fn state_label(&self, now: Instant) -> &'static str {
        match self.admin {
            AdminState::Disabled => "disabled",
            AdminState::Draining => "draining",
            AdminState::Enabled if !self.active.is_up() => "down",
            AdminState::Enabled if self.outlier.is_ejected(now) => "ejected",
            AdminState::Enabled => "active",
        }
    }

    /// Open connections to it (read from the data plane's counters).
    pub fn open_connections(&self) -> u64 {
        self.shared.stats.conns.current()
    }
}

/// A pool as the control plane tracks it.
pub struct PoolState {
    /// Settings.
    pub config: PoolConfig,
    /// Backends, in configured order (then added order).
    pub backends: Vec<BackendState>,
    /// The last published snapshot of this pool.
    pub published: Arc<PoolSnapshot>,
    /// Whether the last rebuild was in panic mode.
    pub panic: bool,
    /// When slow start next changes a weight.
    pub next_slow_start_step: Option<Instant>,
    /// Pool removed by a reload: kept only until its connections are gone.
    pub retired: bool,
    /// Its backends changed state since the last rebuild: health results
    /// only mark the pool, and [`super::Model::rebuild_dirty`] rebuilds it
    /// once for however many changes came in (one rebuild per pool per tick).
    pub dirty: bool,
    /// Table builds that failed (the last table was kept), for the metrics.
    pub build_failures: u64,
    /// State changes since the last rebuild, logged together by it (one
    /// line each when few, a summary line per kind when many).
    pub(super) pending_log: Vec<StateChange>,
}

/// A listener as the control plane tracks it. Its stop signal is the
/// shell's (stopping wakes worker loops: I/O); the model asks for it with
/// [`super::Effects::stop_listeners`].
pub struct ListenerState {
    /// Slot id in the snapshot.
    pub slot: usize,
    /// Settings.
    pub config: Arc<ListenerConfig>,
    /// Counters and the close flag.
    pub stats: Arc<ListenerStats>,
    /// Admission state (buckets, counts).
    pub limits: Arc<crate::admission::limits::ListenerLimits>,
    /// Removed by a reload: its connections are closed at this instant.
    pub retire_deadline: Option<Instant>,
}
