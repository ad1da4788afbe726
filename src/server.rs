//! The running process's handle ([`Server`]): the model behind its lock,
//! the workers' queues and the listeners' stop signals; the one place that
//! carries out model effects ([`Server::apply`]), reloads and shuts down.
//! Start-up is `crate::startup`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{Config, ListenerConfig, Protocol};
use crate::listen::{bind_tcp_for_workers, bind_udp_for_workers};
use crate::model::{CheckJob, Effects, Model, StartListener};
use crate::worker::{Shared, StopSignal, WorkerCmd, WorkerHandle};

/// A running process's handles, owned by the control plane.
pub struct Server {
    /// State shared with workers.
    pub shared: Arc<Shared>,
    /// The control plane's model (the lock is never taken by workers).
    pub model: Mutex<Model>,
    /// Command queues of the workers.
    pub workers: Vec<WorkerHandle>,
    /// Held while a reload runs: one at a time, and a second one is refused
    /// rather than queued behind a file that is slow to read.
    pub reloading: tokio::sync::Mutex<()>,
    /// Woken when a pool is marked dirty (a health check changed a
    /// backend's state): the control plane's ticker rebuilds dirty pools
    /// then, at most once per tick, instead of once per change.
    pub rebuild_soon: tokio::sync::Notify,
    /// Reloads (SIGHUP, `ctl reload`) rejected since start, and whether the last
    /// one was applied: for the metrics and their alert.
    pub reloads: ReloadStats,
    /// Each live listener's stop signal, by slot. Stopping one wakes the
    /// worker loops (an eventfd write), so it is the shell's, not the
    /// model's: the model asks for it in [`Effects::stop_listeners`].
    pub stops: Mutex<HashMap<usize, Arc<StopSignal>>>,
}

/// Outcomes of reloads, for the metrics.
#[derive(Debug)]
pub struct ReloadStats {
    /// Reloads rejected since start.
    pub rejected: std::sync::atomic::AtomicU64,
    /// The last reload was applied (true before any).
    pub last_ok: std::sync::atomic::AtomicBool,
}

impl Default for ReloadStats {
    fn default() -> Self {
        ReloadStats {
            rejected: std::sync::atomic::AtomicU64::new(0),
            last_ok: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl Server {
    /// Publishes the model as a new snapshot (one atomic swap).
    pub fn publish(&self, model: &mut Model) {
        self.shared.snapshot.store(Arc::new(model.snapshot()));
    }

    /// Carries out what the model asked for, in order: log lines, listeners
    /// stopped, new listeners started on their bound `sockets` (by name),
    /// one publish, a close check, a ticker wake-up. Returns the checks to
    /// run (the caller spawns them). The one place model effects are
    /// applied; `model` is the locked model that produced `fx`.
    pub fn apply(&self, model: &mut Model, fx: Effects, sockets: &mut HashMap<String, BoundSockets>) -> Vec<CheckJob> {
        for line in fx.logs {
            log::log!(target: "ringlb::model", line.level, "{}", line.text);
        }
        for slot in fx.stop_listeners {
            if let Some(stop) = self.stops.lock().remove(&slot) {
                stop.stop();
            }
        }
        for l in fx.start_listeners {
            match sockets.remove(&l.config.name) {
                Some(s) => self.start_listener(l, s),
                None => log::error!(
                    "listener \"{}\": no sockets were bound for it; not started",
                    l.config.name
                ),
            }
        }
        if fx.publish {
            self.publish(model);
        }
        if fx.check_close {
            self.tell_workers(|_| WorkerCmd::CheckClose);
        }
        if fx.rebuild_soon {
            self.rebuild_soon.notify_one();
        }
        fx.checks
    }

    /// Sends every worker a command built by `make`. The queue is bounded; a
    /// full one means the worker is far behind and the command is logged.
    pub fn tell_workers(&self, mut make: impl FnMut(usize) -> WorkerCmd) {
        for (id, tx) in self.workers.iter().enumerate() {
            if tx.try_send(make(id)).is_err() {
                log::error!("worker {id}: command queue full; command dropped");
            }
        }
    }

    /// Open client connections across listeners.
    pub fn active_connections(&self) -> u64 {
        self.model
            .lock()
            .listeners
            .iter()
            .map(|l| l.stats.active.current())
            .sum()
    }

    /// Hands bound sockets of a new listener to the workers.
    fn start_listener(&self, listener: StartListener, sockets: BoundSockets) {
        let StartListener { slot, config, stats } = listener;
        let workers = self.workers.len();
        let proto = if config.protocol == Protocol::Udp { "udp" } else { "tcp" };
        log::info!(
            "listener \"{}\" bound on {} ({proto}, {workers} sockets, pool \"{}\")",
            config.name,
            config.bind,
            config.pool
        );
        let stop = Arc::new(StopSignal::default());
        self.stops.lock().insert(slot, stop.clone());
        match sockets {
            BoundSockets::Tcp(sockets) => {
                let mut sockets = sockets.into_iter();
                self.tell_workers(|_| WorkerCmd::ListenTcp {
                    slot,
                    name: config.name.clone(),
                    socket: sockets.next().expect("one socket per worker"),
                    stop: stop.clone(),
                });
            }
            BoundSockets::Udp(sockets) => {
                let mut sockets = sockets.into_iter();
                let per_worker = config.max_flows.div_ceil(workers).max(1);
                self.tell_workers(|_| {
                    WorkerCmd::ListenUdp(crate::udp::proxy::UdpListenerSpec {
                        slot,
                        name: config.name.clone(),
                        socket: sockets.next().expect("one socket per worker"),
                        stop: stop.clone(),
                        max_flows: per_worker,
                        idle_timeout: config.idle_timeout,
                        stats: stats.clone(),
                    })
                });
            }
        }
    }

    /// Re-reads the config file and applies it. A config that fails
    /// validation, or whose new listeners can't be bound, changes nothing.
    ///
    /// The files (the config and its prefixes file) are read and validated
    /// on a blocking-pool thread, never on the control thread itself: a slow
    /// or stuck read delays only this reply, while other control clients,
    /// health checks and drain deadlines carry on.
    pub async fn reload(&self) -> Result<crate::control::protocol::ReloadReply, String> {
        let result = self.reload_once().await;
        // A reload refused because another is running changes nothing either way.
        if !matches!(&result, Err(e) if e.starts_with(RELOAD_BUSY)) {
            use std::sync::atomic::Ordering;
            self.reloads.last_ok.store(result.is_ok(), Ordering::Relaxed);
            if result.is_err() {
                self.reloads.rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn reload_once(&self) -> Result<crate::control::protocol::ReloadReply, String> {
        let _one = self
            .reloading
            .try_lock()
            .map_err(|_| format!("{RELOAD_BUSY}; try again when it has finished"))?;
        let path = self
            .model
            .lock()
            .config
            .source
            .clone()
            .ok_or("this ringlb runs an embedded config; nothing to reload")?;
        let new = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| format!("reading the config failed: {e}"))?
            .map_err(|e| e.to_string())?;
        // The capability check `run` makes (Config::check_host), so a
        // reload cannot switch on a source ringlb could never bind.
        if let Some(l) = new
            .listeners
            .iter()
            .find(|l| l.source == crate::config::SourceMode::Client)
        {
            crate::transparent::probe().map_err(|p| format!("listener \"{}\": source: {p}", l.name))?;
        }
        // Bind what is new before touching anything; which listeners those
        // are is read under the model lock, the binding (whose probe may
        // wait for orphaned sockets) is done without it.
        let to_bind = self.model.lock().listeners_to_bind(&new);
        let mut sockets: HashMap<String, BoundSockets> = HashMap::new();
        for b in to_bind {
            let bound = bind_listener(&b.config, self.workers.len(), b.ours, self.shared.pin_workers)?;
            sockets.insert(b.config.name.clone(), bound);
        }
        let mut model = self.model.lock();
        // Checked and applied under one lock: no ctl command in between.
        let (reply, fx) = model.reload(new, Instant::now())?;
        self.apply(&mut model, fx, &mut sockets);
        Ok(reply)
    }
}

/// The start of the error of a reload refused because another one is running.
const RELOAD_BUSY: &str = "a reload is already in progress";

/// A listener's sockets, one per worker.
pub enum BoundSockets {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

/// Binds a listener's sockets in worker order; `ours`: ringlb's own
/// listener holds the address (see [`bind_tcp_for_workers`]). With `steer`
/// (pinned workers), a TCP listener's new connections then go to the worker
/// on the CPU that received them (UDP keeps the kernel's hash: see
/// [`crate::engine::steering::program`]).
pub fn bind_listener(l: &ListenerConfig, workers: usize, ours: bool, steer: bool) -> Result<BoundSockets, String> {
    Ok(match l.protocol {
        Protocol::Tcp => {
            let sockets = bind_tcp_for_workers(&l.name, l.bind, l.backlog, workers, ours)?;
            if steer {
                crate::engine::steering::steer_by_cpu(&l.name, &sockets);
            }
            BoundSockets::Tcp(sockets)
        }
        Protocol::Udp => BoundSockets::Udp(bind_udp_for_workers(&l.name, l.bind, workers, ours)?),
    })
}

/// Stops accepting, waits for open connections up to `timeout`, then closes
/// the rest. Returns how many were closed by force.
pub async fn graceful_shutdown(server: &Server, timeout: Duration) -> u64 {
    for stop in server.stops.lock().values() {
        stop.stop();
    }
    let deadline = Instant::now() + timeout;
    let mut open = server.active_connections();
    log::info!("shutting down: stopped accepting; {open} connection(s) open, waiting up to {timeout:?}");
    while open > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        open = server.active_connections();
    }
    if open > 0 {
        log::warn!("shutdown timeout: closing {open} connection(s)");
        server.shared.force_close.store(true, Ordering::SeqCst);
        server.tell_workers(|_| WorkerCmd::CheckClose);
        let grace = Instant::now() + Duration::from_secs(2);
        while server.active_connections() > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    open
}
