//! The running process's handle ([`Server`]): the model behind its lock,
//! the workers' queues and the listeners' stop signals; the one place that
//! carries out model effects ([`Server::apply`]), reloads and shuts down.
//! Start-up is `crate::startup`.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The state file as last written (or read at start): a change is
    /// written only when the operator states differ from it.
    pub state_saved: Mutex<Option<(std::path::PathBuf, crate::state_file::StateDoc)>>,
    /// A duplicate of every live listener's sockets (by slot, in worker
    /// order), kept to hand over to a new process (`run --takeover`).
    /// Dropped when the listener stops, so a retired socket is closed.
    pub handover: Mutex<HashMap<usize, Vec<OwnedFd>>>,
    /// A duplicate of the metrics listener, for the same purpose.
    pub metrics_fd: Mutex<Option<(std::net::SocketAddr, OwnedFd)>>,
    /// A takeover is under way (one at a time).
    pub takeover_busy: AtomicBool,
    /// A new process serves on this one's sockets: this one drains and exits.
    pub handed_over: AtomicBool,
    /// Woken when the handover is done (the control plane then shuts down).
    pub handover_done: tokio::sync::Notify,
    /// The control socket's and metrics endpoint's tasks, stopped on handover.
    pub endpoint_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// The drain reports of the process this one took over from, while it runs.
    pub predecessor: Arc<Mutex<Option<crate::protocol::PredecessorStatus>>>,
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
    /// stopped (and their sockets kept for a takeover dropped), one publish,
    /// new listeners started on their bound `sockets` (by name), a close
    /// check, a ticker wake-up. The publish comes before the starts: a new
    /// listener is in the snapshot before any worker has its socket (a
    /// client accepted on a slot the snapshot does not know is closed, and
    /// a handed-over socket has clients queued from the first moment). Returns the checks to
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
            self.handover.lock().remove(&slot);
        }
        if fx.publish || !fx.start_listeners.is_empty() {
            self.publish(model);
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
        if fx.check_close {
            self.tell_workers(|_| WorkerCmd::CheckClose);
        }
        if fx.rebuild_soon {
            self.rebuild_soon.notify_one();
        }
        fx.checks
    }

    /// Writes the operator states to `[control] state_file` if they changed
    /// since the last write: after every control command and reload. A
    /// failed write is logged and tried again at the next change; the
    /// running state is not touched by it.
    pub fn save_state(&self) {
        let (path, doc) = {
            let model = self.model.lock();
            let Some(path) = model.config.control.state_file.clone() else {
                return;
            };
            (path, crate::state_file::collect(&model))
        };
        let mut saved = self.state_saved.lock();
        if saved.as_ref().is_some_and(|(p, d)| *p == path && *d == doc) {
            return;
        }
        match crate::state_file::write(&path, &doc) {
            Ok(()) => {
                log::debug!(
                    "state file {}: {} operator state(s) written",
                    path.display(),
                    doc.backends.len()
                );
                *saved = Some((path, doc));
            }
            Err(e) => log::warn!(
                "state file {}: cannot write it: {e}; operator states will not survive a restart until it can be",
                path.display()
            ),
        }
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

    /// Clients accepted that have neither reached a backend nor been
    /// refused yet (admission, connect attempts): not in
    /// [`Server::active_connections`], but a stop must wait for them too, or
    /// they would be closed between accept and connect. Every accepted
    /// client ends relayed or refused, so this is accepted - relayed -
    /// refused; the outcomes are read before `accepted`, so a race counts
    /// one too many (one more wait), never one too few.
    pub fn connecting(&self) -> u64 {
        self.model
            .lock()
            .listeners
            .iter()
            .map(|l| {
                let settled = l.stats.active.opened.get() + l.stats.refused.iter().map(|c| c.get()).sum::<u64>();
                l.stats.accepted.get().saturating_sub(settled)
            })
            .sum()
    }

    /// Hands bound sockets of a new listener to the workers: socket i to
    /// worker i % workers (more sockets than workers happen when a takeover
    /// inherits more than this process has workers: none is dropped, since
    /// a dropped socket of the group would reset the clients in its queue).
    /// A duplicate of each is kept for a later handover.
    fn start_listener(&self, listener: StartListener, sockets: BoundSockets) {
        let StartListener { slot, config, stats } = listener;
        let workers = self.workers.len();
        let proto = if config.protocol == Protocol::Udp { "udp" } else { "tcp" };
        let count = match &sockets {
            BoundSockets::Tcp(s) => s.len(),
            BoundSockets::Udp(s) => s.len(),
        };
        log::info!(
            "listener \"{}\" bound on {} ({proto}, {count} sockets, pool \"{}\")",
            config.name,
            config.bind,
            config.pool
        );
        let stop = Arc::new(StopSignal::default());
        self.stops.lock().insert(slot, stop.clone());
        let dups: Vec<OwnedFd> = match &sockets {
            BoundSockets::Tcp(s) => s.iter().filter_map(|s| s.as_fd().try_clone_to_owned().ok()).collect(),
            BoundSockets::Udp(s) => s.iter().filter_map(|s| s.as_fd().try_clone_to_owned().ok()).collect(),
        };
        if dups.len() == count {
            self.handover.lock().insert(slot, dups);
        } else {
            log::warn!(
                "listener \"{}\": cannot keep its sockets for a takeover (out of descriptors)",
                config.name
            );
        }
        let send = |i: usize, cmd: WorkerCmd| {
            if self.workers[i % workers].try_send(cmd).is_err() {
                log::error!("worker {}: command queue full; command dropped", i % workers);
            }
        };
        match sockets {
            BoundSockets::Tcp(sockets) => {
                for (i, socket) in sockets.into_iter().enumerate() {
                    send(
                        i,
                        WorkerCmd::ListenTcp {
                            slot,
                            name: config.name.clone(),
                            socket,
                            stop: stop.clone(),
                        },
                    );
                }
            }
            BoundSockets::Udp(sockets) => {
                let per_socket = config.max_flows.div_ceil(count.max(1)).max(1);
                for (i, socket) in sockets.into_iter().enumerate() {
                    send(
                        i,
                        WorkerCmd::ListenUdp(crate::worker::UdpListenerSpec {
                            slot,
                            name: config.name.clone(),
                            socket,
                            stop: stop.clone(),
                            max_flows: per_socket,
                            idle_timeout: config.idle_timeout,
                            stats: stats.clone(),
                        }),
                    );
                }
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
    pub async fn reload(&self) -> Result<crate::protocol::ReloadReply, String> {
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

    async fn reload_once(&self) -> Result<crate::protocol::ReloadReply, String> {
        let _one = self
            .reloading
            .try_lock()
            .map_err(|_| format!("{RELOAD_BUSY}; try again when it has finished"))?;
        crate::systemd::reloading();
        // READY=1 follows every RELOADING=1, whether the reload was applied
        // or rejected: either way the process serves on.
        let result = self.reload_locked().await;
        crate::systemd::ready(&match &result {
            Ok(r) => format!("serving; config generation {}", r.config_generation),
            Err(_) => "serving; last reload rejected".to_string(),
        });
        if result.is_ok() {
            self.save_state();
        }
        result
    }

    /// The reload proper, run under [`Server::reloading`].
    async fn reload_locked(&self) -> Result<crate::protocol::ReloadReply, String> {
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
        // The capability check `run` makes (`host_check::check_host`), so a
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
    // After a handover the service is the new process's: a STOPPING=1 from
    // this one would tell systemd the whole service is stopping.
    if !server.handed_over.load(Ordering::SeqCst) {
        crate::systemd::stopping();
    }
    // The duplicates kept for a takeover would hold the sockets open (in
    // LISTEN, queueing clients nobody accepts) after the workers close theirs.
    server.handover.lock().clear();
    for stop in server.stops.lock().values() {
        stop.stop();
    }
    let deadline = Instant::now() + timeout;
    let mut open = server.active_connections();
    log::info!("shutting down: stopped accepting; {open} connection(s) open, waiting up to {timeout:?}");
    while (open > 0 || server.connecting() > 0) && Instant::now() < deadline {
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
