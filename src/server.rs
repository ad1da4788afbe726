//! Starting and stopping a ringlb process: engine, listeners, workers, and
//! the control plane on its own thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::config::{Config, Protocol};
use crate::engine::resolve_engine;
use crate::listen::bind_tcp_for_workers;
use crate::model::Model;
use crate::worker::{spawn_worker, Shared, WorkerCmd, WORKER_QUEUE};

/// A running process's handles, owned by the control plane.
pub struct Server {
    /// State shared with workers.
    pub shared: Arc<Shared>,
    /// The control plane's model (one writer; the lock is never taken by workers).
    pub model: Mutex<Model>,
    /// Command queues of the workers.
    pub workers: Vec<mpsc::Sender<WorkerCmd>>,
}

impl Server {
    /// Publishes the model as a new snapshot (one atomic swap).
    pub fn publish(&self, model: &mut Model) {
        self.shared.snapshot.store(Arc::new(model.snapshot()));
    }

    /// Asks every worker to run a command built by `make` (best effort: a
    /// full queue means the worker is far behind and the command is logged).
    pub fn tell_workers(&self, mut make: impl FnMut(usize) -> WorkerCmd) {
        for (id, tx) in self.workers.iter().enumerate() {
            if tx.try_send(make(id)).is_err() {
                log::error!("worker {id}: command queue full; command dropped");
            }
        }
    }

    /// Open client connections across listeners.
    pub fn active_connections(&self) -> u64 {
        self.model.lock().listeners.iter().map(|l| l.stats.active.current()).sum()
    }
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
        access_log: AtomicBool::new(config.control.access_log),
        started: Instant::now(),
    });

    // Bind every listener before starting anything: a config whose address is
    // taken never half-starts.
    let model = Model::new(config.clone(), workers);
    let mut bound = Vec::new();
    for l in &config.listeners {
        if l.protocol != Protocol::Tcp {
            return Err(format!("listener \"{}\": only tcp is supported by this build", l.name));
        }
        let sockets = bind_tcp_for_workers(&l.name, l.bind, l.backlog, workers)?;
        bound.push((l.clone(), sockets));
    }

    let mut senders = Vec::new();
    for id in 0..workers {
        let (tx, rx) = mpsc::channel(WORKER_QUEUE);
        spawn_worker(id, shared.clone(), rx, config.runtime.pin_workers).map_err(|e| format!("cannot start worker {id}: {e}"))?;
        senders.push(tx);
    }
    let server = Arc::new(Server { shared: shared.clone(), model: Mutex::new(model), workers: senders });
    {
        let mut model = server.model.lock();
        for (l, sockets) in bound {
            let state = model.add_listener(l.clone());
            let (slot, stop) = (state.slot, state.stop.clone());
            let mut sockets = sockets.into_iter();
            server.tell_workers(|_| WorkerCmd::ListenTcp {
                slot,
                name: l.name.clone(),
                socket: sockets.next().expect("one socket per worker"),
                stop: stop.clone(),
            });
            log::info!("listener \"{}\" bound on {} (tcp, {workers} sockets, pool \"{}\")", l.name, l.bind, l.pool);
        }
        server.publish(&mut model);
    }
    log::info!("ringlb {} running: {} on {engine}", env!("CARGO_PKG_VERSION"), config.summary());

    crate::control::run_control_plane(server)
}

/// Raises the soft open-files limit to the hard limit: a proxy holds two fds
/// per connection, and the usual soft default (1024) caps it at ~500.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
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
