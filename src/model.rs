//! The control plane's model: pools, backends and listeners as configured and
//! changed at runtime (control commands, health, reloads). It is the only
//! writer of the routing snapshot. A control command or reload ends in one
//! rebuild of the affected pool tables and one publish; health changes only
//! mark their pool dirty, and the control plane's tick rebuilds each dirty
//! pool once ([`Model::rebuild_dirty`]), however many backends changed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::{BackendConfig, CheckKind, Config, ListenerConfig, PoolConfig};
use crate::health::state::{
    may_eject, plan_pool, slow_start, ActiveCheck, AdminState, BackendView, Outlier, Transition,
    DEFAULT_SLOW_START_STEPS,
};
use crate::snapshot::{Backend, ListenerView, PoolSnapshot, Snapshot};
use crate::stats::ListenerStats;
use crate::worker::StopSignal;

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
    fn take_back(&mut self, config: BackendConfig, reason: &str, now: Instant) {
        self.config = config;
        self.remove_when_drained = false;
        self.admin = AdminState::Enabled;
        self.drain_deadline = None;
        self.shared.closing.store(false, Ordering::SeqCst);
        self.healthy_since = Some(now);
        self.reason = reason.into();
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
    /// only mark the pool, and [`Model::rebuild_dirty`] rebuilds it once
    /// for however many changes came in (one rebuild per pool per tick).
    pub dirty: bool,
    /// State changes since the last rebuild, logged together by it (one
    /// line each when few, a summary line per kind when many).
    pending_log: Vec<StateChange>,
}

/// One backend state change waiting to be logged.
struct StateChange {
    /// What happened, for the summary ("down", "up", "ejected", ...).
    kind: &'static str,
    addr: SocketAddr,
    /// Why (the summary quotes the first one's).
    reason: String,
    /// The line logged when it is one of few.
    line: String,
}

/// More state changes than this in one pool and tick are summarised.
const LOG_EACH_UP_TO: usize = 3;
/// Addresses named in a summary line.
const SUMMARY_NAMES: usize = 3;
/// State-change log lines (single or summary) per second, over all pools;
/// the rest are counted and reported in one line.
const STATE_LOG_LINES_PER_SEC: u32 = 20;

/// Caps state-change log lines per second.
#[derive(Debug)]
struct LogCap {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl LogCap {
    /// Whether one more line may be logged at `now`.
    fn allow(&mut self, now: Instant) -> bool {
        self.roll(now);
        if self.used < STATE_LOG_LINES_PER_SEC {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Starts a new window once a second has passed, reporting what the
    /// last ones suppressed.
    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                log::warn!(
                    "{} backend state-change log line(s) suppressed (more than {STATE_LOG_LINES_PER_SEC} a second); ctl backends shows every backend's state and reason",
                    self.suppressed
                );
            }
            *self = LogCap {
                window: now,
                used: 0,
                suppressed: 0,
            };
        }
    }
}

/// A listener as the control plane tracks it.
pub struct ListenerState {
    /// Slot id in the snapshot.
    pub slot: usize,
    /// Settings.
    pub config: Arc<ListenerConfig>,
    /// Counters and the close flag.
    pub stats: Arc<ListenerStats>,
    /// Stops its accept loops.
    pub stop: Arc<StopSignal>,
    /// Admission state (buckets, counts).
    pub limits: Arc<crate::admission::limits::ListenerLimits>,
    /// Removed by a reload: its connections are closed at this instant.
    pub retire_deadline: Option<Instant>,
}

/// What the model asks of the caller after a change.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Publish a new snapshot.
    pub publish: bool,
    /// Wake connections so those that must close do.
    pub check_close: bool,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.publish |= other.publish;
        self.check_close |= other.check_close;
    }
}

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
    log_cap: LogCap,
}

/// A control-command error (shown to the operator as is).
pub type CmdResult = Result<Value, String>;

impl Model {
    /// A model of `config`, with no listeners yet (see [`Model::add_listener`]).
    pub fn new(config: Config, workers: usize, now: Instant) -> Model {
        let mut model = Model {
            config: config.clone(),
            workers,
            pools: Vec::new(),
            listeners: Vec::new(),
            config_generation: 1,
            next_slot: 0,
            next_epoch: 0,
            generation: 0,
            log_cap: LogCap {
                window: now,
                used: 0,
                suppressed: 0,
            },
        };
        for p in &config.pools {
            let pool = model.new_pool(p, now);
            model.pools.push(pool);
        }
        for i in 0..model.pools.len() {
            model.rebuild(i, now);
        }
        model
    }

    /// A pool's state before its first rebuild (an empty table).
    fn new_pool(&mut self, config: &PoolConfig, now: Instant) -> PoolState {
        let backends = config
            .backends
            .iter()
            .map(|b| self.new_backend(config, b.clone(), None, now))
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
            pending_log: Vec::new(),
        }
    }

    fn new_backend(
        &mut self,
        pool: &PoolConfig,
        config: BackendConfig,
        shared: Option<Arc<Backend>>,
        now: Instant,
    ) -> BackendState {
        self.next_epoch += 1;
        let hc = &pool.health_check;
        let initially_up = hc.kind == CheckKind::None || hc.initially_up;
        BackendState {
            shared: shared.unwrap_or_else(|| Arc::new(Backend::new(config.addr, self.workers))),
            config,
            admin: AdminState::Enabled,
            drain_deadline: None,
            remove_when_drained: false,
            active: ActiveCheck::new(hc.rise, hc.fall, initially_up),
            outlier: Outlier::new(),
            healthy_since: None,
            was_healthy: initially_up,
            next_check: now
                + jitter(
                    hc.interval.min(hc.jitter.max(Duration::from_millis(1))),
                    self.next_epoch,
                ),
            check_in_flight: false,
            last_check: None,
            reason: if initially_up {
                "configured".into()
            } else {
                "initial_state = down".into()
            },
            epoch: self.next_epoch,
        }
    }

    /// Registers a listener and returns its state (the caller binds sockets).
    pub fn add_listener(&mut self, config: ListenerConfig) -> &ListenerState {
        let slot = self.next_slot;
        self.next_slot += 1;
        let limits = Arc::new(crate::admission::limits::ListenerLimits::new(&config));
        self.listeners.push(ListenerState {
            slot,
            config: Arc::new(config),
            stats: Arc::new(ListenerStats::new(self.workers)),
            stop: Arc::new(StopSignal::default()),
            limits,
            retire_deadline: None,
        });
        self.listeners.last().expect("just pushed")
    }

    /// Index of the live pool named `name`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.config.name == name && !p.retired)
    }

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

    /// Refuses a control command that would leave pool `p` breaking the
    /// pool rules the file is held to ([`crate::config::pool_rule_problems`]),
    /// checked on the pool as the command would leave it: `change` is the
    /// backend it touches and what that backend becomes (`None`: it leaves
    /// the pool), or a new backend (index past the end). `force` lets an
    /// operator who means it leave a pool with nothing usable; it never
    /// bypasses `table_size`, which the table could not be built past.
    fn check_pool_rules(
        &self,
        p: usize,
        change: (usize, Option<crate::config::PoolMember>),
        force: bool,
    ) -> Result<(), String> {
        use crate::config::PoolMember;
        let pool = &self.pools[p];
        let (target, after) = change;
        let members: Vec<PoolMember> = pool
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                if i == target {
                    return after;
                }
                (!b.remove_when_drained).then_some(PoolMember {
                    weight: b.config.weight,
                    in_service: b.admin == AdminState::Enabled,
                })
            })
            .chain((target >= pool.backends.len()).then_some(after).flatten())
            .collect();
        let name = &pool.config.name;
        let problems = crate::config::pool_rule_problems(&members, pool.config.table_size);
        let (forceable, hard): (Vec<_>, Vec<_>) = problems.into_iter().partition(|(key, _)| *key == "backend");
        if let Some((key, problem)) = hard.first() {
            return Err(format!("pool \"{name}\": {key}: {problem}; nothing changed"));
        }
        match forceable.first() {
            None => Ok(()),
            Some((key, problem)) if force => {
                log::warn!("pool \"{name}\": {key}: {problem}: forced by operator");
                Ok(())
            }
            Some((key, problem)) => Err(format!(
                "pool \"{name}\": {key}: {problem}; nothing changed (ringlb ctl --force, or \"force\": true, does it anyway)"
            )),
        }
    }

    /// Builds the snapshot to publish.
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

    /// Rebuilds pool `i`'s table from its backends' admin and health state.
    ///
    /// Design choice (vs Sozu's "build over all, skip unhealthy at lookup"):
    /// the table is rebuilt from the usable set, as Envoy does. A lookup then
    /// stays one hash and one index with no per-lookup health check, and a
    /// backend that is down gets no slots, so connect retries are spent on
    /// live backends. The cost of a flapping backend lands on this thread
    /// only (a build is ~1-3 ms for 100 backends at M = 65537), rise/fall
    /// damp flapping, and health changes are coalesced: at most one rebuild
    /// per pool per control tick (100 ms), however many backends changed;
    /// workers only ever load the finished table.
    pub fn rebuild(&mut self, i: usize, now: Instant) {
        self.flush_state_log(i, now);
        self.pools[i].dirty = false;
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
        let plan = plan_pool(&views, cfg.panic_threshold);
        if plan.panic != pool.panic {
            if plan.panic {
                let healthy = views
                    .iter()
                    .filter(|v| v.healthy && v.admin == AdminState::Enabled)
                    .count();
                log::warn!(
                    "pool \"{}\": panic mode: only {healthy} of {} enabled backends healthy (threshold {}%); balancing over all enabled backends",
                    cfg.name,
                    views.iter().filter(|v| v.admin == AdminState::Enabled).count(),
                    cfg.panic_threshold * 100.0
                );
            } else {
                log::info!("pool \"{}\": panic mode over: enough healthy weight again", cfg.name);
            }
        }
        pool.panic = plan.panic;
        for (b, v) in pool.backends.iter().zip(&views) {
            b.shared.down.store(!v.healthy && !plan.panic, Ordering::Relaxed);
            b.shared.max_conns.store(b.config.max_connections, Ordering::Relaxed);
        }
        pool.next_slow_start_step = next_step;
        let generation = pool.published.generation + 1;
        let started = Instant::now();
        let built = PoolSnapshot::build(
            &cfg.name,
            generation,
            cfg.table_size,
            pool.backends.iter().map(|b| b.shared.clone()).collect(),
            plan.weights.clone(),
        )
        .and_then(|mut snapshot| {
            if let Some(pool_geo) = &cfg.geo {
                let configs: Vec<&BackendConfig> = pool.backends.iter().map(|b| &b.config).collect();
                snapshot.geo = Some(build_geo_tables(
                    pool_geo,
                    geo_cfg,
                    &configs,
                    &plan.weights,
                    cfg.table_size,
                )?);
                snapshot.build_time = started.elapsed();
            }
            Ok(snapshot)
        });
        let snapshot = match built {
            Ok(s) => s,
            Err(e) => {
                // A table that cannot be built is a bug upstream of it (the
                // model let in a state the validator should have refused).
                // Publishing no table would refuse every client of a pool
                // that may well have healthy backends: keep the last one.
                log::error!(
                    "pool \"{}\": cannot build its table ({e}); keeping table generation {}",
                    cfg.name,
                    pool.published.generation
                );
                return;
            }
        };
        if snapshot.table.is_none() && !pool.backends.is_empty() {
            log::warn!("pool \"{}\": no usable backend; new connections are refused", cfg.name);
        }
        log::debug!(
            "pool \"{}\": table generation {generation} built in {:?}",
            cfg.name,
            snapshot.build_time
        );
        pool.published = Arc::new(snapshot);
    }

    // === control commands ===

    /// `drain POOL ADDR` / `disable POOL ADDR`.
    pub fn drain(&mut self, pool: &str, addr: &str, admin: AdminState, force: bool, now: Instant) -> CmdResult {
        let (p, b) = self.find(pool, addr)?;
        let weight = self.pools[p].backends[b].config.weight;
        let after = crate::config::PoolMember {
            weight,
            in_service: false,
        };
        self.check_pool_rules(p, (b, Some(after)), force)?;
        let timeout = self.pools[p].config.drain_timeout;
        let be = &mut self.pools[p].backends[b];
        be.admin = admin;
        be.drain_deadline.get_or_insert(now + timeout);
        be.reason = format!(
            "{} by operator",
            if admin == AdminState::Disabled {
                "disabled"
            } else {
                "drained"
            }
        );
        let remaining = be.shared.stats.conns.current();
        log::info!(
            "pool \"{pool}\": backend {addr} {}: {remaining} connection(s) may finish within {timeout:?}",
            be.reason
        );
        self.rebuild(p, now);
        Ok(json!({"remaining": remaining, "drain_timeout_ms": timeout.as_millis() as u64}))
    }

    /// `enable POOL ADDR`.
    pub fn enable(&mut self, pool: &str, addr: &str, now: Instant) -> CmdResult {
        let (p, b) = self.find(pool, addr)?;
        let be = &mut self.pools[p].backends[b];
        be.admin = AdminState::Enabled;
        be.drain_deadline = None;
        be.shared.closing.store(false, Ordering::SeqCst);
        be.healthy_since = Some(now);
        be.reason = "enabled by operator".into();
        log::info!("pool \"{pool}\": backend {addr} enabled by operator");
        self.rebuild(p, now);
        Ok(json!({}))
    }

    /// `weight POOL ADDR W`.
    pub fn set_weight(&mut self, pool: &str, addr: &str, weight: i64, force: bool, now: Instant) -> CmdResult {
        let checked = crate::config::validate_backend_request(addr, Some(weight)).map_err(|e| e.to_string())?;
        let (p, b) = self.find(pool, addr)?;
        let after = crate::config::PoolMember {
            weight: checked.weight,
            in_service: self.pools[p].backends[b].admin == AdminState::Enabled,
        };
        self.check_pool_rules(p, (b, Some(after)), force)?;
        let be = &mut self.pools[p].backends[b];
        let old = be.config.weight;
        be.config.weight = checked.weight;
        log::info!(
            "pool \"{pool}\": backend {addr} weight {old} -> {} by operator",
            checked.weight
        );
        self.rebuild(p, now);
        Ok(json!({"old_weight": old, "weight": checked.weight}))
    }

    /// `add POOL ADDR [--weight W]`.
    pub fn add_backend(&mut self, pool: &str, addr: &str, weight: Option<i64>, force: bool, now: Instant) -> CmdResult {
        let checked = crate::config::validate_backend_request(addr, weight).map_err(|e| e.to_string())?;
        let p = self
            .pool_index(pool)
            .ok_or_else(|| format!("no pool named \"{pool}\""))?;
        if self.pools[p]
            .backends
            .iter()
            .any(|b| b.config.addr == checked.addr && !b.remove_when_drained)
        {
            return Err(format!("pool \"{pool}\" already has backend {}", checked.addr));
        }
        // A backend still draining from a removal is taken back in its place.
        let draining = self.pools[p]
            .backends
            .iter()
            .position(|b| b.config.addr == checked.addr && b.remove_when_drained);
        let after = crate::config::PoolMember {
            weight: checked.weight,
            in_service: true,
        };
        let target = draining.unwrap_or(self.pools[p].backends.len());
        self.check_pool_rules(p, (target, Some(after)), force)?;
        if let Some(be) = draining.map(|i| &mut self.pools[p].backends[i]) {
            // Still draining from a removal: it comes back as it is.
            let remaining = be.shared.stats.conns.current();
            be.take_back(checked.clone(), "re-added by operator", now);
            log::info!(
                "pool \"{pool}\": backend {} re-added by operator (weight {}) while draining; its {remaining} open connection(s) continue",
                checked.addr,
                checked.weight
            );
            self.rebuild(p, now);
            return Ok(json!({"addr": checked.addr.to_string(), "weight": checked.weight}));
        }
        let cfg = self.pools[p].config.clone();
        let state = self.new_backend(&cfg, checked.clone(), None, now);
        self.pools[p].backends.push(state);
        log::info!(
            "pool \"{pool}\": backend {} added by operator (weight {})",
            checked.addr,
            checked.weight
        );
        self.rebuild(p, now);
        Ok(json!({"addr": checked.addr.to_string(), "weight": checked.weight}))
    }

    /// `remove POOL ADDR`: drains first, leaves once drained.
    pub fn remove_backend(&mut self, pool: &str, addr: &str, force: bool, now: Instant) -> CmdResult {
        let (p, b) = self.find(pool, addr)?;
        self.check_pool_rules(p, (b, None), force)?;
        let timeout = self.pools[p].config.drain_timeout;
        let be = &mut self.pools[p].backends[b];
        be.remove_when_drained = true;
        be.admin = AdminState::Draining;
        be.drain_deadline.get_or_insert(now + timeout);
        be.reason = "removing (draining first)".into();
        let remaining = be.shared.stats.conns.current();
        log::info!("pool \"{pool}\": backend {addr} removed by operator; draining {remaining} connection(s) first");
        self.rebuild(p, now);
        Ok(json!({"remaining": remaining}))
    }

    // === health ===

    /// Records an active check result for backend `epoch` of pool `pool`,
    /// found at `index` when its check started (`CheckJob::index`).
    /// A change of state marks the pool dirty (rebuilt by
    /// [`Model::rebuild_dirty`], once for every change up to then) and
    /// returns true.
    pub fn record_check(
        &mut self,
        (pool, index): (usize, usize),
        epoch: u64,
        passed: Option<bool>,
        latency: Duration,
        detail: String,
        now: Instant,
    ) -> bool {
        let Some(p) = self.pools.get_mut(pool) else {
            return false;
        };
        // `index` is where the backend was when its check started: one
        // lookup, not a scan of the pool per result (removals shift it).
        let at = match p.backends.get(index) {
            Some(b) if b.epoch == epoch => Some(index),
            _ => p.backends.iter().position(|b| b.epoch == epoch),
        };
        let Some(be) = at.map(|i| &mut p.backends[i]) else {
            return false;
        };
        be.check_in_flight = false;
        let interval = p.config.health_check.interval;
        be.next_check = now + interval + jitter(p.config.health_check.jitter, now.elapsed().as_nanos() as u64 ^ epoch);
        let Some(ok) = passed else {
            // Says nothing about the backend: its state stays as it was.
            if !matches!(be.last_check, Some((None, ..))) {
                log::warn!(
                    "pool \"{}\": check of {} {detail}; its state is kept until checks can run",
                    p.config.name,
                    be.config.addr
                );
            }
            be.last_check = Some((None, latency, detail));
            return false;
        };
        let transition = be.active.record(ok);
        be.last_check = Some((Some(ok), latency, detail.clone()));
        let Some(t) = transition else { return false };
        let name = &p.config.name;
        let change = match t {
            Transition::WentDown => {
                be.reason = format!("{} consecutive failed checks: {detail}", be.active.fall());
                StateChange {
                    kind: "down",
                    addr: be.config.addr,
                    reason: be.reason.clone(),
                    line: format!("pool \"{name}\": backend {} is down: {}", be.config.addr, be.reason),
                }
            }
            Transition::WentUp => {
                be.reason = format!("{} consecutive passed checks", be.active.rise());
                be.healthy_since = Some(now);
                StateChange {
                    kind: "up",
                    addr: be.config.addr,
                    reason: be.reason.clone(),
                    line: format!("pool \"{name}\": backend {} is up: {}", be.config.addr, be.reason),
                }
            }
        };
        p.pending_log.push(change);
        p.dirty = true;
        true
    }

    /// Rebuilds every pool marked dirty, once each; true when any was
    /// (the caller publishes one snapshot for all of them).
    pub fn rebuild_dirty(&mut self, now: Instant) -> bool {
        let mut any = false;
        for i in 0..self.pools.len() {
            if self.pools[i].dirty {
                any = true;
                if self.pools[i].retired {
                    self.flush_state_log(i, now);
                    self.pools[i].dirty = false;
                } else {
                    self.rebuild(i, now);
                }
            }
        }
        any
    }

    /// Whether some pool waits for a rebuild.
    pub fn any_dirty(&self) -> bool {
        self.pools.iter().any(|p| p.dirty)
    }

    /// Logs pool `i`'s pending state changes: each as its own line when
    /// there are few, otherwise one summary line per kind ("pool "p": 37
    /// backend(s) down (a, b, c and 34 more; first: reason)"), all under the
    /// per-second cap.
    fn flush_state_log(&mut self, i: usize, now: Instant) {
        let pending = std::mem::take(&mut self.pools[i].pending_log);
        if pending.is_empty() {
            return;
        }
        if pending.len() <= LOG_EACH_UP_TO {
            for c in pending {
                if self.log_cap.allow(now) {
                    log::info!("{}", c.line);
                }
            }
            return;
        }
        let mut kinds: Vec<&'static str> = Vec::new();
        for c in &pending {
            if !kinds.contains(&c.kind) {
                kinds.push(c.kind);
            }
        }
        let parts: Vec<String> = kinds
            .iter()
            .map(|kind| {
                let of_kind: Vec<&StateChange> = pending.iter().filter(|c| c.kind == *kind).collect();
                let names: Vec<String> = of_kind.iter().take(SUMMARY_NAMES).map(|c| c.addr.to_string()).collect();
                let more = of_kind.len().saturating_sub(SUMMARY_NAMES);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                let first = &of_kind[0].reason;
                format!(
                    "{} backend(s) {kind} ({}{more}; first: {first})",
                    of_kind.len(),
                    names.join(", ")
                )
            })
            .collect();
        if self.log_cap.allow(now) {
            log::info!("pool \"{}\": {}", self.pools[i].config.name, parts.join(", "));
        }
    }

    /// Periodic work: passive ejections and their ends, slow-start steps,
    /// drain deadlines, removals, retired listeners and pools.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let mut fx = self.tick_state(now);
        fx.publish |= self.rebuild_dirty(now);
        fx
    }

    /// [`Model::tick`] without the rebuild: changed pools are only marked
    /// dirty, for [`Model::rebuild_dirty`].
    pub fn tick_state(&mut self, now: Instant) -> Effects {
        self.log_cap.roll(now);
        let mut fx = Effects::default();
        for i in 0..self.pools.len() {
            fx.merge(self.tick_pool(i, now));
        }
        let before = self.pools.len();
        self.pools
            .retain(|p| !(p.retired && p.backends.iter().all(|b| b.shared.stats.conns.current() == 0)));
        fx.publish |= self.pools.len() != before;
        for l in &mut self.listeners {
            if let Some(deadline) = l.retire_deadline {
                if now >= deadline && !l.stats.closing.swap(true, Ordering::SeqCst) && l.stats.active.current() > 0 {
                    log::info!(
                        "listener \"{}\": drain timeout passed; closing its remaining connections",
                        l.config.name
                    );
                    fx.check_close = true;
                }
            }
        }
        self.listeners.retain(|l| {
            l.retire_deadline.is_none() || l.stats.active.current() > 0 && !l.stats.closing.load(Ordering::SeqCst)
        });
        fx
    }

    fn tick_pool(&mut self, i: usize, now: Instant) -> Effects {
        let mut fx = Effects::default();
        let mut changed = false;
        let pool = &mut self.pools[i];
        let name = pool.config.name.clone();
        let outlier = pool.config.outlier.clone();
        let total = pool.backends.len();
        let mut ejected = pool.backends.iter().filter(|b| b.outlier.is_ejected(now)).count();
        for be in &mut pool.backends {
            if be.outlier.tick(now) {
                be.reason = "ejection time over".into();
                pool.pending_log.push(StateChange {
                    kind: "back from ejection",
                    addr: be.config.addr,
                    reason: be.reason.clone(),
                    line: format!(
                        "pool \"{name}\": backend {} returns after its ejection time",
                        be.config.addr
                    ),
                });
                be.healthy_since = Some(now);
                ejected = ejected.saturating_sub(1);
                changed = true;
            }
            let failures = be.shared.consecutive_failures.load(Ordering::Relaxed);
            if outlier.consecutive_failures > 0
                && failures >= outlier.consecutive_failures
                && !be.outlier.is_ejected(now)
            {
                let allowed = may_eject(ejected, total, outlier.max_ejection_share * 100.0);
                if let Some(until) = be
                    .outlier
                    .eject(now, outlier.ejection_time, outlier.max_ejection_time, allowed)
                {
                    be.reason = format!("{failures} consecutive connect failures");
                    pool.pending_log.push(StateChange {
                        kind: "ejected",
                        addr: be.config.addr,
                        reason: be.reason.clone(),
                        line: format!(
                            "pool \"{name}\": backend {} ejected for {:?}: {}",
                            be.config.addr,
                            until.saturating_duration_since(now),
                            be.reason
                        ),
                    });
                    ejected += 1;
                    changed = true;
                } else if !allowed {
                    log::warn!(
                        "pool \"{name}\": backend {} has {failures} consecutive connect failures but max_ejection_percent ({}%) keeps it in",
                        be.config.addr,
                        outlier.max_ejection_share * 100.0
                    );
                }
                be.shared.consecutive_failures.store(0, Ordering::Relaxed);
            }
            if let Some(deadline) = be.drain_deadline {
                let open = be.shared.stats.conns.current();
                if now >= deadline && !be.shared.closing.swap(true, Ordering::SeqCst) && open > 0 {
                    log::info!(
                        "pool \"{name}\": backend {}: drain timeout passed; closing {open} connection(s)",
                        be.config.addr
                    );
                    fx.check_close = true;
                }
            }
        }
        let before = pool.backends.len();
        pool.backends.retain(|b| {
            let gone = b.remove_when_drained && b.shared.stats.conns.current() == 0;
            if gone {
                log::info!("pool \"{name}\": backend {} removed (drained)", b.config.addr);
            }
            !gone
        });
        changed |= pool.backends.len() != before;
        if pool.next_slow_start_step.is_some_and(|t| now >= t) {
            changed = true;
        }
        if changed && !pool.retired {
            pool.dirty = true;
        }
        fx
    }

    // === reload ===

    /// The pool rules ([`crate::config::pool_rule_problems`]) applied to
    /// each pool of `new` as [`Model::apply_config`] would leave it: the
    /// operator states of backends that stay are kept, so a drained or
    /// disabled one is not in service (a new or re-added one is). A file
    /// whose kept backends are all drained or disabled would otherwise leave
    /// the pool taking nothing, which `ctl` refuses without `--force`.
    pub fn reload_rule_problems(&self, new: &Config) -> Vec<String> {
        let mut problems = Vec::new();
        for pc in &new.pools {
            let Some(i) = self.pool_index(&pc.name) else { continue };
            let members: Vec<crate::config::PoolMember> = pc
                .backends
                .iter()
                .map(|bc| {
                    let kept = self.pools[i]
                        .backends
                        .iter()
                        .find(|b| b.config.addr == bc.addr && !b.remove_when_drained);
                    crate::config::PoolMember {
                        weight: bc.weight,
                        in_service: kept.is_none_or(|b| b.admin == AdminState::Enabled),
                    }
                })
                .collect();
            for (key, problem) in crate::config::pool_rule_problems(&members, pc.table_size) {
                problems.push(format!(
                    "pool \"{}\": {key}: {problem} (drained and disabled states are kept on reload: enable one first)",
                    pc.name
                ));
            }
        }
        problems
    }

    /// Applies a new, already validated config: pools and backends in place,
    /// listeners updated in place or retired. New listeners are returned for
    /// the caller to bind (it bound their sockets before calling, so a bind
    /// failure never half-applies a reload).
    ///
    /// The file wins for membership and weights: backends not in the file
    /// (including ones added by `ctl add`) are drained and removed, and
    /// weights set by `ctl weight` revert to the file's. Operator states
    /// (drained, disabled) of backends that stay are kept: they are about a
    /// machine, not about the config.
    pub fn apply_config(&mut self, new: Config, now: Instant) -> (Vec<String>, Vec<ListenerConfig>) {
        let mut changes = Vec::new();
        // Pools.
        for pc in &new.pools {
            match self.pool_index(&pc.name) {
                None => {
                    let pool = self.new_pool(pc, now);
                    self.pools.push(pool);
                    changes.push(format!("pool \"{}\" added", pc.name));
                }
                Some(i) => {
                    let mut backends = std::mem::take(&mut self.pools[i].backends);
                    let mut next = Vec::new();
                    for bc in &pc.backends {
                        // A backend still draining from a removal is taken
                        // back (one entry per address, see take_back).
                        match backends.iter().position(|b| b.config.addr == bc.addr) {
                            Some(j) => {
                                let mut b = backends.remove(j);
                                if b.remove_when_drained {
                                    changes.push(format!(
                                        "pool \"{}\": backend {} added back (was draining)",
                                        pc.name, bc.addr
                                    ));
                                    b.take_back(bc.clone(), "back in the config file", now);
                                } else if b.config.weight != bc.weight {
                                    changes.push(format!(
                                        "pool \"{}\": backend {} weight {} -> {}",
                                        pc.name, bc.addr, b.config.weight, bc.weight
                                    ));
                                }
                                if pc.health_check != self.pools[i].config.health_check {
                                    let up = pc.health_check.kind == CheckKind::None || b.active.is_up();
                                    b.active = ActiveCheck::new(pc.health_check.rise, pc.health_check.fall, up);
                                }
                                b.config = bc.clone();
                                next.push(b);
                            }
                            None => {
                                changes.push(format!("pool \"{}\": backend {} added", pc.name, bc.addr));
                                next.push(self.new_backend(pc, bc.clone(), None, now));
                            }
                        }
                    }
                    for mut b in backends {
                        if !b.remove_when_drained {
                            changes.push(format!(
                                "pool \"{}\": backend {} removed (draining)",
                                pc.name, b.config.addr
                            ));
                        }
                        b.remove_when_drained = true;
                        b.admin = AdminState::Draining;
                        b.drain_deadline.get_or_insert(now + pc.drain_timeout);
                        next.push(b);
                    }
                    let old = &self.pools[i].config;
                    if (
                        old.table_size,
                        old.drain_timeout,
                        old.slow_start,
                        &old.health_check,
                        &old.outlier,
                    ) != (
                        pc.table_size,
                        pc.drain_timeout,
                        pc.slow_start,
                        &pc.health_check,
                        &pc.outlier,
                    ) || old.panic_threshold != pc.panic_threshold
                    {
                        changes.push(format!("pool \"{}\" settings updated", pc.name));
                    }
                    self.pools[i].config = pc.clone();
                    self.pools[i].backends = next;
                }
            }
        }
        for p in &mut self.pools {
            if !p.retired && !new.pools.iter().any(|pc| pc.name == p.config.name) {
                changes.push(format!("pool \"{}\" removed (draining)", p.config.name));
                p.retired = true;
                for b in &mut p.backends {
                    b.admin = AdminState::Draining;
                    b.drain_deadline.get_or_insert(now + p.config.drain_timeout);
                }
            }
        }
        for i in 0..self.pools.len() {
            self.rebuild(i, now);
        }

        // Listeners: same name and address = updated in place; otherwise retired/added.
        let mut to_bind = Vec::new();
        for lc in &new.listeners {
            match self
                .listeners
                .iter_mut()
                .find(|l| l.config.name == lc.name && l.retire_deadline.is_none())
            {
                Some(l) if l.config.bind == lc.bind && l.config.protocol == lc.protocol => {
                    if *l.config != *lc {
                        changes.push(format!("listener \"{}\" updated", lc.name));
                        if !l.limits.matches(lc) {
                            // New limits start with fresh buckets and counts;
                            // connections admitted under the old ones release there.
                            l.limits = Arc::new(crate::admission::limits::ListenerLimits::new(lc));
                        }
                        l.config = Arc::new(lc.clone());
                    }
                }
                _ => to_bind.push(lc.clone()),
            }
        }
        for l in &mut self.listeners {
            let stays = new
                .listeners
                .iter()
                .any(|lc| lc.name == l.config.name && lc.bind == l.config.bind && lc.protocol == l.config.protocol);
            if !stays && l.retire_deadline.is_none() {
                let drain = self
                    .config
                    .pool(&l.config.pool)
                    .map_or(Duration::from_secs(30), |p| p.drain_timeout);
                changes.push(format!("listener \"{}\" on {} removed", l.config.name, l.config.bind));
                l.stop.stop();
                l.retire_deadline = Some(now + drain);
            }
        }
        for lc in &to_bind {
            changes.push(format!("listener \"{}\" on {} added", lc.name, lc.bind));
        }
        if new.runtime.workers != self.config.runtime.workers || new.runtime.io_engine != self.config.runtime.io_engine
        {
            changes.push("runtime.workers / runtime.io_engine changed: takes effect on restart only".into());
        }
        if new.runtime.pin_workers != self.config.runtime.pin_workers {
            changes.push("runtime.pin_workers changed: takes effect on restart only".into());
        }
        if new.control.socket != self.config.control.socket || new.control.metrics != self.config.control.metrics {
            changes.push("control.socket / control.metrics changed: takes effect on restart only".into());
        }
        let mut kept = new;
        kept.runtime.workers = self.config.runtime.workers;
        kept.runtime.io_engine = self.config.runtime.io_engine;
        kept.runtime.pin_workers = self.config.runtime.pin_workers;
        kept.control.socket = self.config.control.socket.clone();
        kept.control.metrics = self.config.control.metrics;
        self.config = kept;
        self.config_generation += 1;
        (changes, to_bind)
    }

    /// Backends due for an active check at `now` (marks them in flight).
    pub fn due_checks(&mut self, now: Instant) -> Vec<CheckJob> {
        let mut jobs = Vec::new();
        for (pi, p) in self.pools.iter_mut().enumerate() {
            let hc = &p.config.health_check;
            if hc.kind == CheckKind::None || p.retired {
                continue;
            }
            for (bi, b) in p.backends.iter_mut().enumerate() {
                if b.check_in_flight || now < b.next_check || b.remove_when_drained {
                    continue;
                }
                b.check_in_flight = true;
                let target = b.config.check_addr.unwrap_or_else(|| {
                    let mut a = b.config.addr;
                    if let Some(port) = hc.port {
                        a.set_port(port);
                    }
                    a
                });
                jobs.push(CheckJob {
                    pool: pi,
                    index: bi,
                    pool_name: p.config.name.clone(),
                    epoch: b.epoch,
                    target,
                    kind: hc.kind.clone(),
                    timeout: hc.timeout,
                    max_concurrent: hc.max_concurrent,
                });
            }
        }
        jobs
    }
}

/// Builds a geo pool's tables: one per distinct multiplier row (client
/// regions without a row share the `default` row's table), each from the
/// spill-over weights of `crate::geo::effective_weights`, then scaled by the
/// health plan (slow start, panic) so geo and health compose.
pub fn build_geo_tables(
    pool_geo: &crate::config::PoolGeo,
    geo_cfg: &crate::config::GeoConfig,
    backends: &[&BackendConfig],
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
                    .map(|((e, p), b)| {
                        let full = u64::from(b.weight) * u64::from(crate::health::state::WEIGHT_SCALE);
                        if *p == 0 || full == 0 {
                            0
                        } else {
                            ((u64::from(*e) * u64::from(*p) / full).max(u64::from(*e > 0))) as u32
                        }
                    })
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

/// One active check to run.
#[derive(Debug, Clone)]
pub struct CheckJob {
    /// Pool index.
    pub pool: usize,
    /// Backend index when the check started (a hint: the epoch decides).
    pub index: usize,
    /// Pool name (for the concurrency limit).
    pub pool_name: String,
    /// Backend incarnation.
    pub epoch: u64,
    /// Address checked.
    pub target: SocketAddr,
    /// What to do.
    pub kind: CheckKind,
    /// Time allowed.
    pub timeout: Duration,
    /// The pool's concurrency limit.
    pub max_concurrent: usize,
}

/// A deterministic pseudo-random delay in `[0, max)` (splitmix64 of `seed`):
/// enough to spread checks of many backends, no RNG dependency.
fn jitter(max: Duration, seed: u64) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    Duration::from_nanos(z % max.as_nanos().max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with_checked_backend(now: Instant) -> Model {
        let text = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n\n[[pool]]\nname = \"p\"\n\
                    [pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"0s\"\nfall = 2\nrise = 2\n\
                    [[pool.backend]]\naddr = \"127.0.0.1:2\"\n";
        let config = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        Model::new(config, 1, now)
    }

    #[test]
    fn a_table_that_cannot_be_built_keeps_the_previous_one() {
        let now = Instant::now();
        let mut m = model_with_checked_backend(now);
        let before = m.pools[0].published.clone();
        assert!(before.table.is_some());
        // The same address twice: MaglevTable::build refuses it.
        let cfg = m.pools[0].config.clone();
        let dup = m.new_backend(&cfg, cfg.backends[0].clone(), None, now);
        m.pools[0].backends.push(dup);
        m.rebuild(0, now);
        assert!(Arc::ptr_eq(&before, &m.pools[0].published), "previous table kept");
    }

    #[test]
    fn re_adding_a_draining_backend_takes_its_entry_over() {
        let now = Instant::now();
        let mut m = model_with_checked_backend(now);
        m.add_backend("p", "127.0.0.1:3", None, false, now).unwrap();
        let shared = m.pools[0].backends[1].shared.clone();
        m.remove_backend("p", "127.0.0.1:3", false, now).unwrap();
        m.add_backend("p", "127.0.0.1:3", Some(4), false, now).unwrap();
        assert_eq!(m.pools[0].backends.len(), 2, "one entry per address");
        let b = &m.pools[0].backends[1];
        assert!(Arc::ptr_eq(&shared, &b.shared), "same counters");
        assert_eq!(
            (b.state_label(now), b.remove_when_drained, b.config.weight),
            ("active", false, 4)
        );
        assert!(m.pools[0].published.table.is_some());
    }

    #[test]
    fn checks_that_could_not_run_leave_the_backend_as_it_was() {
        let t0 = Instant::now();
        let mut m = model_with_checked_backend(t0);
        let ms = Duration::from_millis(1);
        for i in 0..10 {
            let now = t0 + Duration::from_secs(i + 1);
            let jobs = m.due_checks(now);
            assert_eq!(jobs.len(), 1, "a check is due every interval, not-run or not");
            let changed = m.record_check((0, 0), jobs[0].epoch, None, ms, "not run: EMFILE".into(), now);
            assert!(!changed);
        }
        let b = &m.pools[0].backends[0];
        assert_eq!(b.state_label(t0), "active");
        assert!(matches!(&b.last_check, Some((None, _, d)) if d.starts_with("not run")));
        // Real failures still count: two take it out.
        for i in 10..12 {
            let now = t0 + Duration::from_secs(i + 1);
            let epoch = m.due_checks(now)[0].epoch;
            m.record_check((0, 0), epoch, Some(false), ms, "connection refused".into(), now);
        }
        assert_eq!(m.pools[0].backends[0].state_label(t0), "down");
    }
}
