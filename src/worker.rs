//! Worker threads: one native event loop per worker (io_uring or epoll)
//! serving its TCP and UDP listeners, fed commands by the control plane
//! through a bounded queue and an eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam::channel;
use parking_lot::Mutex;

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
    /// Set when a new process took the listening sockets over (`run
    /// --takeover`): a stopped UDP listener then keeps answering its
    /// existing flows until they go idle instead of ending them at once.
    pub handed_over: AtomicBool,
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
    /// Worker loops to wake when stopped (they check the flag then).
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl StopSignal {
    /// Asks every waiter to stop; idempotent.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
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
}

impl WorkerInbox {
    /// The next queued command, if any.
    pub fn try_recv(&self) -> Option<WorkerCmd> {
        self.rx.try_recv().ok()
    }
}

/// Starts worker `id`'s loop thread on the process's engine; it runs until
/// the process exits.
pub fn spawn_worker(id: usize, shared: Arc<Shared>, pin_to_cpu: bool) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = channel::bounded(WORKER_QUEUE);
    let waker = Arc::new(Waker::new()?);
    let inbox = WorkerInbox {
        rx,
        waker: waker.clone(),
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
