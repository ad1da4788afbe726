//! Starting, reloading and stopping a ringlb process: engine, listeners,
//! workers, and the control plane on its own thread.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{Config, ListenerConfig, Protocol};
use crate::control::{run_control_plane, ControlEndpoints};
use crate::engine::resolve_engine;
use crate::listen::{bind_tcp_for_workers, bind_udp_for_workers};
use crate::model::Model;
use crate::worker::{spawn_worker, Shared, WorkerCmd, WorkerHandle};

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
    /// The state file as last written (or read at start): a change is
    /// written only when the operator states differ from it.
    pub state_saved: Mutex<Option<(std::path::PathBuf, crate::state_file::StateDoc)>>,
    /// A duplicate of every live listener's sockets (by slot, in worker
    /// order), kept to hand over to a new process (`run --takeover`).
    /// Dropped when the listener retires, so a retired socket is closed.
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
    pub predecessor: Arc<Mutex<Option<serde_json::Value>>>,
}

impl Server {
    /// Publishes the model as a new snapshot (one atomic swap).
    pub fn publish(&self, model: &mut Model) {
        self.shared.snapshot.store(Arc::new(model.snapshot()));
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
    fn start_listener(&self, model: &mut Model, config: ListenerConfig, sockets: BoundSockets) {
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
        let state = model.add_listener(config.clone());
        let (slot, stop, stats) = (state.slot, state.stop.clone(), state.stats.clone());
        // In the snapshot before any worker has the socket: a client accepted
        // on a slot the snapshot does not know is closed, and a handed-over
        // socket has clients queued from the first moment.
        self.publish(model);
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
                        WorkerCmd::ListenUdp(crate::udp::proxy::UdpListenerSpec {
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

    /// Drops the kept duplicates of listeners that are retired or gone, so
    /// their sockets close when the workers close theirs.
    fn prune_handover(&self, model: &Model) {
        self.handover.lock().retain(|slot, _| {
            model
                .listeners
                .iter()
                .any(|l| l.slot == *slot && l.retire_deadline.is_none())
        });
    }

    /// Re-reads the config file and applies it. A config that fails
    /// validation, or whose new listeners can't be bound, changes nothing.
    ///
    /// The files (the config and its prefixes file) are read and validated
    /// on a blocking-pool thread, never on the control thread itself: a slow
    /// or stuck read delays only this reply, while other control clients,
    /// health checks and drain deadlines carry on.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let _one = self
            .reloading
            .try_lock()
            .map_err(|_| "a reload is already in progress; try again when it has finished".to_string())?;
        crate::systemd::reloading();
        // READY=1 follows every RELOADING=1, whether the reload was applied
        // or rejected: either way the process serves on.
        let result = self.reload_locked().await;
        crate::systemd::ready(&match &result {
            Ok(_) => format!("serving; config generation {}", self.model.lock().config_generation),
            Err(_) => "serving; last reload rejected".to_string(),
        });
        result
    }

    /// The reload proper, run under [`Server::reloading`].
    async fn reload_locked(&self) -> Result<Vec<String>, String> {
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
        // Bind what is new before touching anything; which listeners those
        // are is read under the model lock, the binding (whose probe may
        // wait for orphaned sockets) is done without it.
        let to_bind: Vec<(&ListenerConfig, bool)> = {
            let model = self.model.lock();
            let live = || model.listeners.iter().filter(|s| s.retire_deadline.is_none());
            new.listeners
                .iter()
                .filter(|l| {
                    !live()
                        .any(|s| s.config.name == l.name && s.config.bind == l.bind && s.config.protocol == l.protocol)
                })
                .map(|l| {
                    // A port moved or kept under a new name: ringlb holds it
                    // itself, through a listener this reload retires (the
                    // new config has no two overlapping listeners).
                    let ours = live().any(|s| {
                        s.config.protocol == l.protocol && crate::config::addresses_overlap(s.config.bind, l.bind)
                    });
                    (l, ours)
                })
                .collect()
        };
        let mut sockets: HashMap<String, BoundSockets> = HashMap::new();
        for (l, ours) in to_bind {
            sockets.insert(
                l.name.clone(),
                bind_listener(l, self.workers.len(), ours, self.shared.pin_workers)?,
            );
        }
        let mut model = self.model.lock();
        // Checked under the lock that applies it: no ctl command in between.
        let problems = model.reload_rule_problems(&new);
        if !problems.is_empty() {
            let file = model
                .config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(format!("{file}: {}; nothing changed", problems.join("; ")));
        }
        let (changes, to_start) = model.apply_config(new, Instant::now());
        for l in to_start {
            let s = sockets.remove(&l.name).expect("bound above");
            self.start_listener(&mut model, l, s);
        }
        self.publish(&mut model);
        self.prune_handover(&model);
        let generation = model.config_generation;
        drop(model);
        self.save_state();
        if changes.is_empty() {
            log::info!("reload (config generation {generation}): no changes");
        } else {
            log::info!("reload (config generation {generation}): {}", changes.join("; "));
        }
        Ok(changes)
    }
}

/// A listener's sockets, one per worker.
enum BoundSockets {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

/// Binds a listener's sockets in worker order; `ours`: ringlb's own
/// listener holds the address (see [`bind_tcp_for_workers`]). With `steer`
/// (pinned workers), a TCP listener's new connections then go to the worker
/// on the CPU that received them (UDP keeps the kernel's hash: see
/// [`crate::engine::steering::program`]).
fn bind_listener(l: &ListenerConfig, workers: usize, ours: bool, steer: bool) -> Result<BoundSockets, String> {
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

/// Starts ringlb with `config` and blocks until it has shut down. With
/// `takeover`, the listening sockets (and the metrics listener) come from
/// the ringlb answering on the config's control socket, which stops
/// accepting once this process serves (see [`crate::control::takeover`]).
pub fn run(config: Config, takeover: bool) -> Result<(), String> {
    let started = Instant::now();
    let (engine, fallback_reason) = resolve_engine(config.runtime.io_engine)?;
    if let Some(why) = fallback_reason {
        log::warn!("io_uring unavailable ({why}); workers run on the epoll engine");
    }
    raise_fd_limit();
    let workers = config.runtime.workers;
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(Default::default()),
        force_close: AtomicBool::new(false),
        handed_over: AtomicBool::new(false),
        workers,
        engine,
        pin_workers: config.runtime.pin_workers,
        access_log: AtomicBool::new(config.control.access_log),
        started: Instant::now(),
        worker_setup: Mutex::new(Vec::new()),
    });

    let mut inherited = match (takeover, &config.control.socket) {
        (false, _) => None,
        (true, None) => {
            return Err("--takeover needs [control] socket: the running ringlb is asked for its sockets there".into())
        }
        (true, Some(path)) => {
            let got = crate::control::takeover::request(path)?;
            log::info!(
                "takeover: process {} (ringlb {}, config generation {}) handed over {} listener(s), {} socket(s)",
                got.offer.pid,
                got.offer.version,
                got.offer.config_generation,
                got.offer.listeners.len(),
                got.offer.fds
            );
            Some(got)
        }
    };

    // Bind everything before starting anything: a config whose address is
    // taken never half-starts (and, in a takeover, never disturbs the
    // running process, which has changed nothing yet).
    let mut bound = Vec::new();
    for l in &config.listeners {
        let sockets = match inherited.as_mut() {
            Some(inh) => match inh.take_listener(l.bind, l.protocol) {
                Some(fds) => inherited_sockets(l, fds, workers)?,
                None => {
                    let ours = inh.overlaps(l.bind, l.protocol);
                    bind_listener(l, workers, ours, config.runtime.pin_workers)?
                }
            },
            None => bind_listener(l, workers, false, config.runtime.pin_workers)?,
        };
        bound.push((l.clone(), sockets));
    }
    if let Some(inh) = &inherited {
        let dropped = inh.untaken();
        if !dropped.is_empty() {
            log::info!(
                "takeover: listener(s) {} of the previous process are not in this config: closed",
                dropped.join(", ")
            );
        }
    }
    let metrics_fd = std::sync::Mutex::new(None);
    // In a takeover the running process answers on the path until this one
    // serves: bound beside it, moved there before the old one lets go.
    let mut control_temp = None;
    let endpoints = ControlEndpoints {
        socket: match config.control.socket.as_deref() {
            None => None,
            Some(p) if takeover => {
                let (listener, temp) = crate::control::socket::bind_control_socket_beside(p)?;
                control_temp = Some(RemoveOnDrop(Some(temp)));
                Some(listener)
            }
            Some(p) => Some(crate::control::socket::bind_control_socket(p)?),
        },
        metrics: match config.control.metrics {
            None => None,
            Some(addr) => {
                let l = match inherited.as_mut().and_then(|inh| inh.take_metrics(addr)) {
                    Some(fd) => std::net::TcpListener::from(fd),
                    None => std::net::TcpListener::bind(addr)
                        .map_err(|e| format!("control.metrics: cannot bind {addr}: {e}"))?,
                };
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                if let Ok(dup) = l.as_fd().try_clone_to_owned() {
                    *metrics_fd.lock().expect("not poisoned") = Some((addr, dup));
                }
                log::info!("metrics on http://{addr}/metrics");
                Some(l)
            }
        },
    };
    if let Some(p) = &config.control.socket {
        log::info!("control socket {}", p.display());
    }

    let mut senders = Vec::new();
    for id in 0..workers {
        let handle = spawn_worker(id, shared.clone(), config.runtime.pin_workers)
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        senders.push(handle);
    }
    let mut model = Model::new(config.clone(), workers, Instant::now());
    // Before anything is served: a drained backend never takes a connection.
    let state_saved = crate::state_file::restore(&mut model, Instant::now())
        .and_then(|doc| Some((config.control.state_file.clone()?, doc)));
    let server = Arc::new(Server {
        shared,
        model: Mutex::new(model),
        workers: senders,
        reloading: tokio::sync::Mutex::new(()),
        rebuild_soon: tokio::sync::Notify::new(),
        state_saved: Mutex::new(state_saved),
        handover: Mutex::new(HashMap::new()),
        metrics_fd: Mutex::new(metrics_fd.into_inner().expect("not poisoned")),
        takeover_busy: AtomicBool::new(false),
        handed_over: AtomicBool::new(false),
        handover_done: tokio::sync::Notify::new(),
        endpoint_tasks: Mutex::new(Vec::new()),
        predecessor: Arc::new(Mutex::new(None)),
    });
    {
        let mut model = server.model.lock();
        for (l, sockets) in bound {
            server.start_listener(&mut model, l, sockets);
        }
        server.publish(&mut model);
    }
    log::info!(
        "ringlb {} running: {} on {engine}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    match inherited {
        None => crate::systemd::ready(&format!("serving; {}", config.summary())),
        Some(inh) => {
            let old = inh.offer.pid;
            if let (Some(temp), Some(path)) = (control_temp.as_mut().and_then(|t| t.0.take()), &config.control.socket) {
                if let Err(e) = crate::control::socket::install_control_socket(&temp, path) {
                    log::error!("takeover: {e}; ctl reaches the old process there until it exits, then nothing");
                }
            }
            match inh.confirm() {
                Ok(reader) => {
                    log::info!(
                        "takeover: serving {:?} after --takeover; process {old} stops accepting and finishes its connections",
                        started.elapsed()
                    );
                    crate::control::takeover::watch_predecessor(reader, server.predecessor.clone());
                }
                Err(e) => log::warn!("takeover: {e}; serving anyway (both processes may accept until it stops)"),
            }
            crate::systemd::main_pid_ready(&format!("serving (took over from process {old}); {}", config.summary()));
        }
    }
    let result = run_control_plane(server.clone(), endpoints);
    // After a handover the socket path is the new process's.
    if let Some(p) = &config.control.socket {
        if !server.handed_over.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// A file removed when this goes out of scope unless taken out first: the
/// control socket bound beside the old process's, if the start fails.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A listener's handed-over sockets, checked to be what the config says;
/// topped up with new sockets in the same SO_REUSEPORT group when this
/// process has more workers than the old one had.
fn inherited_sockets(l: &ListenerConfig, fds: Vec<OwnedFd>, workers: usize) -> Result<BoundSockets, String> {
    let kind = match l.protocol {
        Protocol::Tcp => socket2::Type::STREAM,
        Protocol::Udp => socket2::Type::DGRAM,
    };
    for fd in &fds {
        crate::control::takeover::check_socket(fd, kind, l.bind)
            .map_err(|e| format!("--takeover: listener \"{}\": {e}", l.name))?;
    }
    let missing = workers.saturating_sub(fds.len());
    Ok(match l.protocol {
        Protocol::Tcp => {
            let mut sockets: Vec<std::net::TcpListener> = fds.into_iter().map(std::net::TcpListener::from).collect();
            if missing > 0 {
                sockets.extend(bind_tcp_for_workers(&l.name, l.bind, l.backlog, missing, true)?);
            }
            BoundSockets::Tcp(sockets)
        }
        Protocol::Udp => {
            let mut sockets: Vec<std::net::UdpSocket> = fds.into_iter().map(std::net::UdpSocket::from).collect();
            if missing > 0 {
                sockets.extend(bind_udp_for_workers(&l.name, l.bind, missing, true)?);
            }
            BoundSockets::Udp(sockets)
        }
    })
}

/// Raises the soft open-files limit to the hard limit: a proxy holds two fds
/// per connection, and the usual soft default (1024) caps it at ~500.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                log::info!("open files limit raised from {before} to {}", lim.rlim_cur);
            }
        }
    }
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
    for l in &server.model.lock().listeners {
        l.stop.stop();
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
