//! Sends client datagrams on their flows' sockets, batched on a private io_uring where the engine allows.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::snapshot::Backend;
use crate::stats::ListenerStats;
use crate::udp::flow::Flow;
use crate::udp::flow_table::FlowTable;
use crate::udp::uring_batch::{self, Done, UringBatch};

/// Sends client datagrams to their flows' backends without waiting: a full
/// socket buffer drops the datagram (UDP semantics) rather than stalling
/// every other flow of this worker. On io_uring the sends of one burst are
/// queued on a private ring and go out in one syscall at
/// [`Forwarder::finish`]; elsewhere each is a plain non-blocking send(2).
pub struct Forwarder {
    ring: Option<UringBatch>,
    /// Client of each queued send, by tag.
    clients: Vec<SocketAddr>,
    done: Vec<Done>,
}

impl Forwarder {
    /// A forwarder that batches on io_uring when `io_uring` is set and a ring can be made.
    pub fn new(io_uring: bool, worker: usize, listener: &str) -> Forwarder {
        let ring = if io_uring {
            UringBatch::new()
                .map_err(|e| {
                    log::warn!(
                        "worker {worker}: udp listener \"{listener}\": no io_uring for batched sends ({e}): one send per datagram"
                    )
                })
                .ok()
        } else {
            None
        };
        Forwarder {
            ring,
            clients: Vec::with_capacity(uring_batch::CAPACITY),
            done: Vec::with_capacity(uring_batch::CAPACITY),
        }
    }

    /// Forwards `data` on `flow`'s socket, now or at the next [`Forwarder::finish`].
    ///
    /// # Safety
    /// Until the next `finish`, `data` must stay valid and unchanged and the
    /// flow's socket open: call `finish` before reusing the receive buffers
    /// and before closing any flow.
    pub unsafe fn forward(&mut self, flow: &Flow, client: SocketAddr, stats: &ListenerStats, data: &[u8]) {
        let Some(ring) = self.ring.as_mut() else {
            match flow.socket.send(data) {
                Ok(n) => flow.backend.stats.bytes_in.add(n as u64),
                Err(e) => on_forward_error(&flow.backend, stats, e.raw_os_error().unwrap_or(0)),
            }
            return;
        };
        if ring.is_full() {
            // Callers finish every burst, and a burst is smaller than the ring.
            stats.datagrams_dropped.inc();
            return;
        }
        // SAFETY: the caller keeps `data` untouched and the flow's socket open
        // until `finish` (this function's contract).
        unsafe {
            ring.push_send(
                flow.socket.as_raw_fd(),
                data.as_ptr(),
                data.len(),
                self.clients.len() as u32,
            )
        };
        self.clients.push(client);
        // Counted when queued: a send that fails is counted as dropped too.
        flow.backend.stats.bytes_in.add(data.len() as u64);
    }

    /// Runs the queued sends and accounts for the ones that failed.
    pub fn finish(&mut self, flows: &mut FlowTable<SocketAddr, Flow>, stats: &ListenerStats) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if ring.is_empty() {
            return;
        }
        self.done.clear();
        if let Err(e) = ring.complete(&mut self.done) {
            log::warn!("udp: batched sends failed ({e}): one send per datagram from now on");
            stats
                .datagrams_dropped
                .add((self.clients.len() - self.done.len()) as u64);
            self.ring = None;
        }
        for d in &self.done {
            if d.result < 0 {
                let client = self.clients[d.tag as usize];
                match flows.get(&client, Instant::now()) {
                    Some(flow) => on_forward_error(&flow.backend, stats, -d.result),
                    None => stats.datagrams_dropped.inc(),
                }
            }
        }
        self.clients.clear();
    }
}

/// A forward that failed: the datagram is lost; ICMP port unreachable from
/// an earlier datagram is a passive health failure of the backend.
fn on_forward_error(backend: &Backend, stats: &ListenerStats, errno: i32) {
    stats.datagrams_dropped.inc();
    if crate::errno::udp_send_blames_backend(errno) {
        backend.connect_failed();
    }
}
