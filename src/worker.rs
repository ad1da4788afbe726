//! Worker threads: one native event loop per worker for TCP (io_uring or
//! epoll), fed commands by the control plane through a bounded queue and
//! an eventfd; beside it, one UDP thread per worker.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam::channel;
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use crate::engine::waker::Waker;
use crate::engine::IoEngine;
use crate::snapshot::Snapshot;
use crate::udp::proxy::UdpListenerSpec;

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
    /// Workers are pinned to CPUs (`runtime.pin_workers` at start), so new
    /// TCP connections are steered to the worker on the receiving CPU.
    pub pin_workers: bool,
    /// Log one line per connection.
    pub access_log: AtomicBool,
    /// When ringlb started.
    pub started: Instant,
    /// How each worker's loop was set up (e.g. the io_uring flags), for
    /// `ctl status`; filled in as workers start.
    pub worker_setup: Mutex<Vec<String>>,
}

impl Shared {
    /// Records how worker `id`'s loop was set up (shown by `ctl status`).
    pub fn set_worker_setup(&self, id: usize, setup: String) {
        let mut all = self.worker_setup.lock();
        if all.len() <= id {
            all.resize(id + 1, String::new());
        }
        all[id] = setup;
    }
}

/// A stop request for one listener's accept loops.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    notify: Notify,
    /// Worker loops to wake when stopped (they check the flag then).
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl StopSignal {
    /// Asks every waiter to stop; idempotent.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        for w in self.wakers.lock().iter() {
            w.wake();
        }
    }

    /// Whether stop was asked.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Wakes `waker` when stopped (at once if it already is).
    pub fn register(&self, waker: Arc<Waker>) {
        let mut wakers = self.wakers.lock();
        if self.is_stopped() {
            waker.wake();
        }
        if !wakers.iter().any(|w| Arc::ptr_eq(w, &waker)) {
            wakers.push(waker);
        }
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
    ListenUdp(UdpListenerSpec),
    /// Wake every connection so it checks whether it must close
    /// (its backend's `closing` flag, or [`Shared::force_close`]).
    CheckClose,
}

/// Capacity of a worker's command queue; commands are rare (reloads, drains).
pub const WORKER_QUEUE: usize = 256;

/// The control plane's end of a worker's command queue.
pub struct WorkerHandle {
    tx: channel::Sender<WorkerCmd>,
    waker: Arc<Waker>,
}

impl WorkerHandle {
    /// Queues `cmd` and wakes the worker; `Err` when the queue is full
    /// (the worker is far behind).
    pub fn try_send(&self, cmd: WorkerCmd) -> Result<(), WorkerCmd> {
        self.tx.try_send(cmd).map_err(|e| e.into_inner())?;
        self.waker.wake();
        Ok(())
    }
}

/// A worker's end of its command queue.
pub struct WorkerInbox {
    rx: channel::Receiver<WorkerCmd>,
    /// Written by the control plane after each command and by stopped
    /// listeners; the loop waits on it.
    pub waker: Arc<Waker>,
    udp: mpsc::Sender<UdpListenerSpec>,
}

impl WorkerInbox {
    /// The next queued command, if any.
    pub fn try_recv(&self) -> Option<WorkerCmd> {
        self.rx.try_recv().ok()
    }

    /// Hands a UDP listener to this worker's UDP thread.
    pub fn forward_udp(&self, spec: UdpListenerSpec) {
        if let Err(e) = self.udp.try_send(spec) {
            let spec = match e {
                mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
            };
            log::error!(
                "udp listener \"{}\": its worker's UDP thread is not taking it",
                spec.name
            );
        }
    }
}

/// A UDP thread's own state, shared by its tasks (never by other threads).
pub struct WorkerCtx {
    /// Worker index.
    pub id: usize,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Batch forwards on a private io_uring (the io_uring engine).
    pub io_uring: bool,
    #[allow(clippy::redundant_allocation)]
    cached: RefCell<Option<Rc<Arc<Snapshot>>>>,
}

impl WorkerCtx {
    /// The current snapshot. The thread keeps its own `Rc` of it so that a
    /// datagram clones a thread-local count, not a shared atomic one (the
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
}

/// Starts worker `id` on the process's engine: its TCP loop thread and its
/// UDP thread. They run until the process exits.
pub fn spawn_worker(id: usize, shared: Arc<Shared>, pin_to_cpu: bool) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = channel::bounded(WORKER_QUEUE);
    let waker = Arc::new(Waker::new()?);
    let udp = spawn_udp_thread(id, shared.clone(), pin_to_cpu)?;
    let inbox = WorkerInbox {
        rx,
        waker: waker.clone(),
        udp,
    };
    std::thread::Builder::new()
        .name(format!("ringlb-w{id}"))
        .spawn(move || {
            if pin_to_cpu {
                pin_current_thread(id);
            }
            crate::stats::set_worker_slot(id);
            let result = match shared.engine {
                IoEngine::Uring => crate::engine::ring::run(id, shared.clone(), inbox),
                IoEngine::Epoll => crate::engine::readiness::run(id, shared.clone(), inbox),
            };
            if let Err(e) = result {
                log::error!("worker {id}: cannot start its {} loop: {e}", shared.engine);
            }
        })?;
    Ok(WorkerHandle { tx, waker })
}

/// The UDP side of worker `id`: a tokio current-thread runtime serving the
/// UDP listeners handed to it (recvmmsg/sendmmsg bursts, one epoll set of
/// flow sockets, forwards batched on a private io_uring on that engine).
fn spawn_udp_thread(
    id: usize,
    shared: Arc<Shared>,
    pin_to_cpu: bool,
) -> std::io::Result<mpsc::Sender<UdpListenerSpec>> {
    let (tx, mut rx) = mpsc::channel::<UdpListenerSpec>(WORKER_QUEUE);
    std::thread::Builder::new()
        .name(format!("ringlb-w{id}-udp"))
        .spawn(move || {
            if pin_to_cpu {
                pin_current_thread(id);
            }
            // Counters written here share the worker's shard.
            crate::stats::set_worker_slot(id);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a current-thread tokio runtime");
            let io_uring = shared.engine == IoEngine::Uring;
            tokio::task::LocalSet::new().block_on(&rt, async move {
                let ctx = Rc::new(WorkerCtx {
                    id,
                    shared,
                    io_uring,
                    cached: RefCell::new(None),
                });
                while let Some(spec) = rx.recv().await {
                    tokio::task::spawn_local(crate::udp::proxy::udp_loop(ctx.clone(), spec));
                }
            });
        })?;
    Ok(tx)
}

/// How many CPUs worker pinning spreads over: worker N goes to CPU
/// N % this (connection steering maps CPUs back to workers with it).
pub fn pinning_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pin_current_thread(id: usize) {
    let cpus = pinning_cpus();
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
