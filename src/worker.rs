//! Worker threads: one runtime per thread, fed commands by the control plane.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, Notify};

use crate::engine::{Engine, IoEngine};
use crate::fd_reserve::FdReserve;
use crate::proxy::buffers::BufPool;
use crate::snapshot::Snapshot;

/// State shared by every thread of one ringlb process.
pub struct Shared {
    /// The routing snapshot; replaced whole on every change.
    pub snapshot: ArcSwap<Snapshot>,
    /// Set when every open connection must close now (shutdown timeout).
    pub force_close: AtomicBool,
    /// Worker count.
    pub workers: usize,
    /// Engine the workers run on.
    pub engine: IoEngine,
    /// Log one line per connection.
    pub access_log: AtomicBool,
    /// When ringlb started.
    pub started: Instant,
}

/// A stop request for one listener's accept loops.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    notify: Notify,
}

impl StopSignal {
    /// Asks every waiter to stop; idempotent.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Whether stop was asked.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Resolves once stop was asked (immediately if it already was).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.is_stopped() {
            return;
        }
        notified.await;
    }
}

/// What the control plane asks of a worker.
pub enum WorkerCmd {
    /// Start accepting on this socket (one SO_REUSEPORT socket per worker).
    ListenTcp {
        /// Listener slot in the snapshot.
        slot: usize,
        /// Listener name, for logs.
        name: String,
        /// The bound, listening socket.
        socket: std::net::TcpListener,
        /// Fires when the listener is removed or ringlb shuts down.
        stop: Arc<StopSignal>,
    },
    /// Start serving a UDP listener on this socket.
    ListenUdp(crate::udp::proxy::UdpListenerSpec),
    /// Wake every connection so it checks whether it must close
    /// (its backend's `closing` flag, or [`Shared::force_close`]).
    CheckClose,
}

/// Capacity of a worker's command queue; commands are rare (reloads, drains).
pub const WORKER_QUEUE: usize = 256;

/// A worker's own state, shared by its tasks (never by other threads).
pub struct WorkerCtx {
    /// Worker index.
    pub id: usize,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Relay buffers.
    pub bufs: BufPool,
    /// Pipes of the splice relay.
    pub pipes: crate::proxy::splice::PipePool,
    /// Woken on [`WorkerCmd::CheckClose`]; only this worker's tasks wait on it.
    pub close: Notify,
    /// A spare descriptor freed on EMFILE so pending clients can be accepted
    /// and refused at once instead of waiting in the backlog.
    pub fd_reserve: FdReserve,
    #[allow(clippy::redundant_allocation)]
    cached: RefCell<Option<Rc<Arc<Snapshot>>>>,
}

impl WorkerCtx {
    /// The current snapshot. The worker keeps its own `Rc` of it so that a
    /// connection clones a thread-local count, not a shared atomic one (the
    /// extra allocation happens once per published snapshot, not per use).
    #[allow(clippy::redundant_allocation)]
    pub fn snapshot(&self) -> Rc<Arc<Snapshot>> {
        let current = self.shared.snapshot.load();
        let mut cached = self.cached.borrow_mut();
        match &*cached {
            Some(rc) if Arc::ptr_eq(rc, &current) => rc.clone(),
            _ => {
                let rc = Rc::new(Arc::clone(&current));
                *cached = Some(rc.clone());
                rc
            }
        }
    }

    /// Resolves when this connection (to `backend`) must close.
    pub async fn close_requested(&self, backend: &crate::snapshot::Backend, listener: &crate::stats::ListenerStats) {
        loop {
            let notified = self.close.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if backend.is_closing()
                || listener.closing.load(Ordering::Relaxed)
                || self.shared.force_close.load(Ordering::Relaxed)
            {
                return;
            }
            notified.await;
        }
    }
}

/// Starts worker `id` on `engine`; it runs until the process exits.
pub fn spawn_worker(
    id: usize,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<WorkerCmd>,
    pin_to_cpu: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("ringlb-w{id}"))
        .spawn(move || {
            if pin_to_cpu {
                pin_current_thread(id);
            }
            match shared.engine {
                IoEngine::Uring => run::<crate::engine::uring::Uring>(id, shared, commands),
                IoEngine::Epoll => run::<crate::engine::epoll::Epoll>(id, shared, commands),
            }
        })
}

fn pin_current_thread(id: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(id % cpus, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "worker {id}: could not pin to cpu {}: {}",
                id % cpus,
                std::io::Error::last_os_error()
            );
        }
    }
}

fn run<E: Engine>(id: usize, shared: Arc<Shared>, mut commands: mpsc::Receiver<WorkerCmd>) {
    E::block_on(async move {
        crate::stats::set_worker_slot(id);
        log::info!("worker {id} started on {}", E::NAME);
        let ctx = Rc::new(WorkerCtx {
            id,
            shared,
            bufs: BufPool::default(),
            pipes: Default::default(),
            close: Notify::new(),
            fd_reserve: FdReserve::new(1),
            cached: RefCell::new(None),
        });
        while let Some(cmd) = commands.recv().await {
            match cmd {
                WorkerCmd::ListenTcp {
                    slot,
                    name,
                    socket,
                    stop,
                } => {
                    let local: Option<SocketAddr> = socket.local_addr().ok();
                    match E::listener(socket) {
                        Ok(listener) => E::spawn(crate::proxy::tcp::accept_loop::<E>(
                            ctx.clone(),
                            slot,
                            name,
                            listener,
                            stop,
                        )),
                        Err(e) => log::error!("worker {id}: listener \"{name}\" ({local:?}): {e}"),
                    }
                }
                WorkerCmd::ListenUdp(spec) => E::spawn(crate::udp::proxy::udp_loop::<E>(ctx.clone(), spec)),
                WorkerCmd::CheckClose => ctx.close.notify_waiters(),
            }
        }
    });
}
