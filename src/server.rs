//! Starting, reloading and stopping a ringlb process: engine, listeners,
//! workers, and the control plane on its own thread.

use std::collections::HashMap;
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

    /// Hands bound sockets of a new listener to the workers.
    fn start_listener(&self, model: &mut Model, config: ListenerConfig, sockets: BoundSockets) {
        let workers = self.workers.len();
        let proto = if config.protocol == Protocol::Udp { "udp" } else { "tcp" };
        log::info!(
            "listener \"{}\" bound on {} ({proto}, {workers} sockets, pool \"{}\")",
            config.name,
            config.bind,
            config.pool
        );
        let state = model.add_listener(config.clone());
        let (slot, stop, stats) = (state.slot, state.stop.clone(), state.stats.clone());
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

/// Starts ringlb with `config` and blocks until it has shut down.
pub fn run(config: Config) -> Result<(), String> {
    let (engine, fallback_reason) = resolve_engine(config.runtime.io_engine)?;
    if let Some(why) = fallback_reason {
        log::warn!("io_uring unavailable ({why}); workers run on the epoll engine");
    }
    raise_fd_limit();
    let workers = config.runtime.workers;
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(Default::default()),
        force_close: AtomicBool::new(false),
        workers,
        engine,
        pin_workers: config.runtime.pin_workers,
        access_log: AtomicBool::new(config.control.access_log),
        started: Instant::now(),
        worker_setup: Mutex::new(Vec::new()),
    });

    // Bind everything before starting anything: a config whose address is
    // taken never half-starts.
    let mut bound = Vec::new();
    for l in &config.listeners {
        bound.push((l.clone(), bind_listener(l, workers, false, config.runtime.pin_workers)?));
    }
    let endpoints = ControlEndpoints {
        socket: config
            .control
            .socket
            .as_deref()
            .map(crate::control::socket::bind_control_socket)
            .transpose()?,
        metrics: match config.control.metrics {
            None => None,
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| format!("control.metrics: cannot bind {addr}: {e}"))?;
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
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
    crate::systemd::ready(&format!("serving; {}", config.summary()));
    let result = run_control_plane(server, endpoints);
    if let Some(p) = &config.control.socket {
        let _ = std::fs::remove_file(p);
    }
    result
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
    crate::systemd::stopping();
    for l in &server.model.lock().listeners {
        l.stop.stop();
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
