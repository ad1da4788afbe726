//! The UDP data plane of one listener on one worker: flows, their backend
//! sockets, replies. It is plain synchronous code that the worker's loop
//! (io_uring or epoll) calls when the listener socket or the flow sockets
//! are readable, and when flows are due to expire.
//!
//! A datagram from a new client address opens a flow: the backend is chosen
//! by the pool's Maglev table on the flow key (the same selection as TCP),
//! and the flow gets its own connected UDP socket toward that backend, so
//! the backend's replies come back on it and go to the client from the
//! listener's address.
//!
//! Reads are readiness-first on both engines: a completion read would park
//! its buffer until a datagram comes, and a datagram can be 64 KiB, so a
//! pending read per flow would pin 64 GiB at a million flows. Client
//! datagrams are read in bursts (recvmmsg) and forwarded on their flows'
//! sockets; the flow sockets sit in one epoll set ([`FlowPoller`]) whose
//! descriptor the worker's loop watches, and the replies of the ready flows
//! go to their clients in bursts (sendmmsg). A million flows cost a million
//! sockets and table entries, and no task or op per flow. On the io_uring
//! engine the forwards of a burst, each on its own flow's socket, go to the
//! kernel together on a private ring ([`Forwarder`]): one syscall per burst
//! instead of one per datagram (bench/README.md).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::snapshot::Snapshot;
use crate::stats::{ListenerStats, RefuseReason};
use crate::udp::flow::{connect_udp, usable, Flow};
use crate::udp::flow_poller::FlowPoller;
use crate::udp::flow_table::FlowTable;
use crate::udp::forwarder::Forwarder;
use crate::udp::mmsg::BATCH;
use crate::udp::recv_batch::RecvBatch;
use crate::udp::send_batch::SendBatch;
use crate::worker::stop::StopSignal;

/// Client datagrams read per call of [`UdpListener::on_readable`] before the
/// loop serves its other sockets (TCP connections, other listeners).
const READ_BUDGET: usize = 4 * BATCH;
/// Replies relayed per call of [`UdpListener::on_replies`], likewise.
const REPLY_BUDGET: usize = 256;
/// Expiry runs at least this far apart (the flow table's own wheel ticks).
const EXPIRY_MIN_GAP: Duration = Duration::from_millis(5);
/// And at least this often, so an idle listener still notices stops.
const EXPIRY_MAX_GAP: Duration = Duration::from_secs(1);

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

/// A UDP listener's state on one worker.
pub struct UdpListener {
    slot: usize,
    /// Listener name, for logs.
    pub name: String,
    worker: usize,
    listener: UdpSocket,
    flows: FlowTable<SocketAddr, Flow>,
    /// The flow sockets; the worker's loop waits on its descriptor.
    poller: FlowPoller,
    /// Flow socket descriptor -> client. An entry may be stale (its flow
    /// gone, the number reused); a reply is trusted only when the client's
    /// current flow still owns that descriptor. Bounded by the highest
    /// descriptor number, i.e. by RLIMIT_NOFILE.
    client_by_fd: Vec<Option<SocketAddr>>,
    stats: Arc<ListenerStats>,
    /// Fires when the listener is removed or ringlb shuts down.
    pub stop: Arc<StopSignal>,
    recv: RecvBatch,
    send: SendBatch,
    forwarder: Forwarder,
    ready: Vec<RawFd>,
    expired: Vec<(SocketAddr, Flow)>,
    next_expiry: Instant,
    /// Stopped after a handover: the listener socket is no longer read
    /// (the new process reads it), the existing flows' replies are still
    /// relayed until the flows go idle.
    pub draining: bool,
}

impl UdpListener {
    /// Serves `spec` on worker `worker`; forwards are batched on a private
    /// io_uring when `io_uring` is set.
    pub fn new(worker: usize, io_uring: bool, spec: UdpListenerSpec, now: Instant) -> std::io::Result<UdpListener> {
        spec.socket.set_nonblocking(true)?;
        let forwarder = Forwarder::new(io_uring, worker, &spec.name);
        Ok(UdpListener {
            slot: spec.slot,
            worker,
            listener: spec.socket,
            flows: FlowTable::new(spec.max_flows, spec.idle_timeout, now),
            poller: FlowPoller::new()?,
            client_by_fd: Vec::new(),
            stats: spec.stats,
            stop: spec.stop,
            recv: RecvBatch::default(),
            send: SendBatch::default(),
            forwarder,
            ready: Vec::new(),
            expired: Vec::new(),
            next_expiry: now + EXPIRY_MIN_GAP,
            draining: false,
            name: spec.name,
        })
    }

    /// Flows open on this worker.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The listening socket (readable: client datagrams are waiting).
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The flow sockets' epoll set (readable: some flow has a reply).
    pub fn poller_fd(&self) -> BorrowedFd<'_> {
        self.poller.as_fd()
    }

    /// Reads and forwards client datagrams until the socket is drained or
    /// the budget is used. Returns true when it stopped on the budget (the
    /// loop should call again soon).
    pub fn on_readable(&mut self, snapshot: &Snapshot) -> bool {
        let fd = self.listener.as_raw_fd();
        let mut read = 0;
        while read < READ_BUDGET {
            match self.recv.recv(fd) {
                Ok(n) => {
                    self.relay_burst(snapshot, n);
                    read += n;
                    if n < BATCH {
                        // Fewer than asked: the queue is empty now.
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    log::debug!("worker {}: udp listener \"{}\": {e}", self.worker, self.name);
                    return false;
                }
            }
        }
        true
    }

    /// Relays the ready flows' replies to their clients, up to the budget.
    /// Returns true when it stopped on the budget.
    pub fn on_replies(&mut self) -> bool {
        let mut relayed = 0;
        while relayed < REPLY_BUDGET {
            let mut ready = std::mem::take(&mut self.ready);
            if let Err(e) = self.poller.ready(&mut ready) {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    log::debug!("udp flow epoll set: {e}");
                }
            }
            if ready.is_empty() {
                self.ready = ready;
                return false;
            }
            for &fd in &ready {
                relayed += self.read_reply(fd);
                if self.send.is_full() {
                    self.send_replies();
                }
            }
            self.send_replies();
            self.ready = ready;
        }
        true
    }

    /// When [`UdpListener::expire`] is due next.
    pub fn next_expiry(&self) -> Instant {
        self.next_expiry
    }

    /// Closes idle flows (the table's timer wheel makes this proportional
    /// to the flows that expire, not to all flows).
    pub fn expire(&mut self, now: Instant) {
        self.flows.expire(now, &mut self.expired);
        // Dropping a flow closes its socket.
        self.expired.clear();
        let next = self.flows.next_deadline().unwrap_or(now + EXPIRY_MAX_GAP);
        self.next_expiry = next.clamp(now + EXPIRY_MIN_GAP, now + EXPIRY_MAX_GAP);
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        // The listener socket can no longer send replies: end every flow.
        self.flows.retain(|_, _| false);
        log::debug!("worker {}: udp listener \"{}\" stopped", self.worker, self.name);
    }
}

impl UdpListener {
    /// Forwards the first `n` datagrams of a received burst.
    fn relay_burst(&mut self, snapshot: &Snapshot, n: usize) {
        for i in 0..n {
            // Splitting the borrows: the datagram lives in `recv`, the flows and
            // the forwarder are other fields.
            let Some((client, data)) = self.recv.get(i) else {
                continue;
            };
            on_datagram(
                Ctx {
                    snapshot,
                    slot: self.slot,
                    flows: &mut self.flows,
                    poller: &self.poller,
                    client_by_fd: &mut self.client_by_fd,
                    stats: &self.stats,
                    forwarder: &mut self.forwarder,
                },
                client,
                data,
            );
        }
        self.forwarder.finish(&mut self.flows, &self.stats);
    }

    /// Reads one datagram from the flow socket `fd` into the batch; returns how
    /// many replies it queued (0 or 1).
    fn read_reply(&mut self, fd: RawFd) -> usize {
        let Some(client) = self.client_by_fd.get(fd as usize).copied().flatten() else {
            return 0;
        };
        let now = Instant::now();
        let (flows, batch) = (&mut self.flows, &mut self.send);
        // A stale descriptor (its flow closed, the number reused by another
        // listener or a connection) is not this flow's: leave it alone.
        let Some(flow) = flows.get(&client, now).filter(|f| f.socket.as_raw_fd() == fd) else {
            return 0;
        };
        match flow.socket.recv(batch.next_buf()) {
            Ok(n) => {
                flow.backend.connect_succeeded();
                flow.backend.stats.bytes_out.add(n as u64);
                batch.push(n, client);
                1
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // ICMP port unreachable from an earlier datagram: a passive failure.
                flow.backend.connect_failed();
                0
            }
            Err(e) => {
                log::debug!("udp flow {client}: {e}");
                flows.remove(&client);
                0
            }
        }
    }

    /// Sends the queued replies to their clients through the listener socket.
    fn send_replies(&mut self) {
        if self.send.is_empty() {
            return;
        }
        let done = self.send.flush(self.listener.as_raw_fd());
        let stats = &self.stats;
        stats.datagrams_out.add(done.sent as u64);
        stats.bytes_out.add(done.bytes as u64);
        if done.dropped > 0 {
            stats.datagrams_dropped.add(done.dropped as u64);
        }
    }
}

/// What handling one datagram touches: the listener's fields, borrowed
/// apart from its receive batch (which holds the datagram).
struct Ctx<'a> {
    snapshot: &'a Snapshot,
    slot: usize,
    flows: &'a mut FlowTable<SocketAddr, Flow>,
    poller: &'a FlowPoller,
    client_by_fd: &'a mut Vec<Option<SocketAddr>>,
    stats: &'a Arc<ListenerStats>,
    forwarder: &'a mut Forwarder,
}

/// Refuses a datagram under `reason`. For UDP, `accepted` counts the
/// datagrams that opened a flow or were refused, so that, as for TCP,
/// `accepted = relayed + Σ refused` (relayed = flows opened).
fn refuse(stats: &ListenerStats, reason: RefuseReason) {
    stats.accepted.inc();
    stats.refuse(reason);
    stats.datagrams_dropped.inc();
}

/// Handles one client datagram: find or open its flow, forward it.
fn on_datagram(ctx: Ctx<'_>, client: SocketAddr, data: &[u8]) {
    let Ctx {
        snapshot,
        slot,
        flows,
        poller,
        client_by_fd,
        stats,
        forwarder,
    } = ctx;
    let now = Instant::now();
    stats.datagrams_in.inc();
    stats.bytes_in.add(data.len() as u64);
    let Some(listener) = snapshot.listener(slot) else {
        return;
    };
    let source = listener.limits.source_key(client.ip());
    if let Err(reason) = listener.limits.check_packet(source, now) {
        // Refused under its real reason, and a datagram dropped all the same.
        refuse(stats, reason);
        return;
    }
    if let Some(flow) = flows.get(&client, now) {
        if usable(&flow.backend) {
            // SAFETY: `data` is in the receive batch, which relay_burst does
            // not reuse before its `finish`; no flow closes before that either
            // (the re-pick below finishes first).
            unsafe { forwarder.forward(flow, client, stats, data) };
            return;
        }
        // Its backend is down, removed or past its drain: re-pick below.
        // Queued sends may name its socket: run them before it closes.
        forwarder.finish(flows, stats);
        flows.remove(&client);
    }
    if let Err(reason) = listener.limits.check_flow(source, now) {
        refuse(stats, reason);
        return;
    }
    let pool = &snapshot.pools[listener.pool];
    // The same selection as TCP connects and `ctl route`.
    let Some(selection) = crate::conn::select(pool, client, listener.config.hash_key, 4) else {
        refuse(stats, RefuseReason::NoBackend);
        return;
    };
    if flows.len() >= flows.capacity() {
        refuse(stats, RefuseReason::FlowTableFull);
        return;
    }
    let Some(backend) = selection
        .candidates()
        .iter()
        .map(|&i| &pool.backends[i as usize])
        .find(|b| usable(b))
    else {
        refuse(stats, RefuseReason::NoBackend);
        return;
    };
    let socket = match connect_udp(backend.addr).and_then(|s| poller.add(s.as_fd()).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            log::debug!("udp flow {client} -> {}: {e}", backend.addr);
            refuse(stats, RefuseReason::Overloaded);
            return;
        }
    };
    let fd = socket.as_raw_fd();
    stats.active.opened.inc();
    backend.stats.conns.opened.inc();
    backend.stats.udp_flows.opened.inc();
    let flow = Flow {
        backend: backend.clone(),
        socket,
        stats: stats.clone(),
    };
    let Ok(flow) = flows.insert(client, flow, now) else {
        // Not reached (the table's room was checked above). The flow was
        // opened and is closed on drop, so it counts as relayed, not refused:
        // every accepted datagram still has exactly one outcome.
        stats.accepted.inc();
        stats.datagrams_dropped.inc();
        return;
    };
    stats.accepted.inc();
    let index = fd as usize;
    if client_by_fd.len() <= index {
        client_by_fd.resize(index + 1, None);
    }
    client_by_fd[index] = Some(client);
    // SAFETY: as above: the batch and this new flow outlive the burst's `finish`.
    unsafe { forwarder.forward(flow, client, stats, data) };
}
