//! The worker context: what a worker's loop is given and shares (the
//! process-wide [`Shared`], its command queue and the commands, listener
//! stop signals). The engines and UDP listeners import this; it imports
//! neither (the threads are started by `engine::spawn`).

use std::fmt;
use std::net::UdpSocket;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam::channel;
use parking_lot::Mutex;

use crate::snapshot::Snapshot;
use crate::stats::ListenerStats;

pub use super::stop::StopSignal;
use super::waker::Waker;

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
    /// Access log mode: 0 off, 1 text, 2 JSON ([`Shared::access_log`]).
    pub access_log: std::sync::atomic::AtomicU8,
    /// When ringlb started.
    pub started: Instant,
    /// How each worker's loop was set up (e.g. the io_uring flags), for
    /// `ctl status`; filled in as workers start.
    pub worker_setup: Mutex<Vec<String>>,
}

impl Shared {
    /// The access log mode for a new connection.
    #[inline]
    pub fn access_log(&self) -> crate::config::AccessLog {
        match self.access_log.load(std::sync::atomic::Ordering::Relaxed) {
            1 => crate::config::AccessLog::Text,
            2 => crate::config::AccessLog::Json,
            _ => crate::config::AccessLog::Off,
        }
    }

    /// Records how worker `id`'s loop was set up (shown by `ctl status`).
    pub fn set_worker_setup(&self, id: usize, setup: String) {
        let mut all = self.worker_setup.lock();
        if all.len() <= id {
            all.resize(id + 1, String::new());
        }
        all[id] = setup;
    }
}

/// The engine workers actually run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// The native io_uring loop.
    Uring,
    /// The edge-triggered epoll loop.
    Epoll,
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngine::Uring => "io_uring",
            IoEngine::Epoll => "epoll",
        })
    }
}

/// A UDP listener as handed to one worker.
pub struct UdpListenerSpec {
    /// Listener slot in the snapshot.
    pub slot: usize,
    /// Listener name, for logs.
    pub name: String,
    /// This worker's bound SO_REUSEPORT socket.
    pub socket: UdpSocket,
    /// Fires when the listener is removed or ringlb shuts down.
    pub stop: Arc<StopSignal>,
    /// This worker's share of the listener's max_flows.
    pub max_flows: usize,
    /// Flow idle timeout.
    pub idle_timeout: Duration,
    /// The listener's counters.
    pub stats: Arc<ListenerStats>,
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

/// A new command queue and its waker: the control plane's end and the
/// worker's.
pub fn queue() -> std::io::Result<(WorkerHandle, WorkerInbox)> {
    let (tx, rx) = channel::bounded(WORKER_QUEUE);
    let waker = Arc::new(Waker::new()?);
    let inbox = WorkerInbox {
        rx,
        waker: waker.clone(),
    };
    Ok((WorkerHandle { tx, waker }, inbox))
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

/// How many CPUs worker pinning spreads over: worker N goes to CPU
/// N % this (connection steering maps CPUs back to workers with it).
pub fn pinning_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
