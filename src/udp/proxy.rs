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

use crate::config::SourceMode;
use crate::snapshot::{Backend, Snapshot};
use crate::stats::{ListenerStats, RefuseReason};
use crate::udp::datagram::{prepare, Short};
use crate::udp::flow::{connect_udp, usable, Flow};
use crate::udp::flow_poller::FlowPoller;
use crate::udp::flow_table::FlowTable;
use crate::udp::forwarder::Forwarder;
use crate::udp::mmsg::BATCH;
use crate::udp::recv_batch::RecvBatch;
use crate::udp::send_batch::SendBatch;
use crate::worker::{StopSignal, UdpListenerSpec};

/// Client datagrams read per call of [`UdpListener::on_readable`] before the
/// loop serves its other sockets (TCP connections, other listeners).
const READ_BUDGET: usize = 4 * BATCH;
/// Replies relayed per call of [`UdpListener::on_replies`], likewise.
const REPLY_BUDGET: usize = 256;
/// Expiry runs at least this far apart (the flow table's own wheel ticks).
const EXPIRY_MIN_GAP: Duration = Duration::from_millis(5);
/// And at least this often, so an idle listener still notices stops.
const EXPIRY_MAX_GAP: Duration = Duration::from_secs(1);

/// A UDP listener's state on one worker.
pub struct UdpListener {
    slot: usize,
    /// Listener name, for logs.
    pub name: String,
    worker: usize,
    listener: UdpSocket,
    flows: FlowTable<SocketAddr, Flow>,
    /// `hash_key = "token"`: token hash -> the backend its first flow took,
    /// so a new address carrying a known token joins it even after the
    /// table changed. Bounded and expired like the flows; empty (and
    /// unallocated) on other listeners.
    tokens: FlowTable<u64, Arc<Backend>>,
    /// The address clients send to, for PROXY headers.
    local: SocketAddr,
    /// A wildcard bind now reads each datagram's destination (asked for
    /// only once a PROXY header needs it: other listeners pay nothing).
    destinations: bool,
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
    expired_tokens: Vec<(u64, Arc<Backend>)>,
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
        let local = spec.socket.local_addr()?;
        Ok(UdpListener {
            tokens: FlowTable::new(spec.max_flows, spec.idle_timeout, now),
            local,
            destinations: false,
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
            expired_tokens: Vec::new(),
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
        if self.local.ip().is_unspecified() && !self.destinations {
            self.want_destinations(snapshot);
        }
        let mut read = 0;
        while read < READ_BUDGET {
            match self.recv.recv(self.listener.as_fd()) {
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
        for (_, f) in self.expired.iter_mut() {
            if let Some(l) = f.log.as_mut() {
                l.end = "idle_timeout";
            }
        }
        // Dropping a flow closes its socket.
        self.expired.clear();
        if !self.tokens.is_empty() {
            self.tokens.expire(now, &mut self.expired_tokens);
            self.expired_tokens.clear();
        }
        let next = self.flows.next_deadline().unwrap_or(now + EXPIRY_MAX_GAP);
        let next = self.tokens.next_deadline().map_or(next, |t| t.min(next));
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
    /// On a wildcard bind with PROXY v2 on: asks the kernel for each
    /// datagram's destination address, so the header names the address the
    /// client reached rather than `0.0.0.0` (datagrams already queued still
    /// name the wildcard).
    fn want_destinations(&mut self, snapshot: &Snapshot) {
        let Some(l) = snapshot.listener(self.slot) else {
            return;
        };
        if l.config.proxy_protocol != crate::config::ProxyProtocol::V2 {
            return;
        }
        self.destinations = true;
        let (level, name) = if self.local.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
        };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our open listener socket with a pointer to a
        // live c_int and its size; the result is checked.
        let rc = unsafe {
            libc::setsockopt(
                self.listener.as_raw_fd(),
                level,
                name,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let set = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        match set {
            Ok(()) => self.recv.want_destinations(),
            Err(e) => log::warn!(
                "udp listener \"{}\": cannot read datagram destinations ({e}): PROXY headers name {}",
                self.name,
                self.local
            ),
        }
    }

    /// Forwards the first `n` datagrams of a received burst.
    fn relay_burst(&mut self, snapshot: &Snapshot, n: usize) {
        for i in 0..n {
            // Splitting the borrows: the datagram lives in `recv`, the flows and
            // the forwarder are other fields.
            let local = match self.recv.destination(i) {
                Some(ip) => SocketAddr::new(ip, self.local.port()),
                None => self.local,
            };
            let Some((client, buf, start, end)) = self.recv.get_mut(i) else {
                continue;
            };
            on_datagram(
                Ctx {
                    snapshot,
                    slot: self.slot,
                    flows: &mut self.flows,
                    tokens: &mut self.tokens,
                    local,
                    poller: &self.poller,
                    client_by_fd: &mut self.client_by_fd,
                    stats: &self.stats,
                    forwarder: &mut self.forwarder,
                },
                client,
                buf,
                start..end,
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
                if let Some(l) = flow.log.as_mut() {
                    l.down.0 += 1;
                    l.down.1 += n as u64;
                }
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
        let done = self.send.flush(self.listener.as_fd());
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
    tokens: &'a mut FlowTable<u64, Arc<Backend>>,
    local: SocketAddr,
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

/// Handles one client datagram, `buf[payload]` (with headroom before it
/// for a PROXY header): find or open its flow, forward it.
fn on_datagram(ctx: Ctx<'_>, client: SocketAddr, buf: &mut [u8], payload: std::ops::Range<usize>) {
    let Ctx {
        snapshot,
        slot,
        flows,
        tokens,
        local,
        poller,
        client_by_fd,
        stats,
        forwarder,
    } = ctx;
    let now = Instant::now();
    stats.datagrams_in.inc();
    stats.bytes_in.add(payload.len() as u64);
    let Some(listener) = snapshot.listener(slot) else {
        return;
    };
    let config = &*listener.config;
    let source = listener.limits.source_key(client.ip());
    if let Err(reason) = listener.limits.check_packet(source, now) {
        // Refused under its real reason, and a datagram dropped all the same.
        refuse(stats, reason);
        return;
    }
    // Token routing: the key is read (and stripped) before anything else,
    // so every datagram of a token listener carries one or is dropped.
    let (token, range) = match prepare(
        config.token.as_ref(),
        config.proxy_protocol,
        client,
        local,
        buf,
        payload,
    ) {
        Ok(done) => done,
        Err(Short) => {
            stats.datagrams_short.inc();
            stats.datagrams_dropped.inc();
            return;
        }
    };
    let data = &buf[range];
    if let Some(flow) = flows.get(&client, now) {
        let same_session = token.is_none_or(|hash| hash == flow.token);
        if same_session && usable(&flow.backend) {
            if let Some(hash) = token {
                tokens.touch(&hash, now);
            }
            if let Some(l) = flow.log.as_mut() {
                l.up.0 += 1;
                l.up.1 += data.len() as u64;
            }
            // SAFETY: `data` is in the receive batch, which relay_burst does
            // not reuse before its `finish`; no flow closes before that either
            // (the re-pick below finishes first).
            unsafe { forwarder.forward(flow, client, stats, data) };
            return;
        }
        // Its backend is down, removed or past its drain, or the address now
        // carries another session's token: re-pick below.
        // Queued sends may name its socket: run them before it closes.
        forwarder.finish(flows, stats);
        flows.remove(&client);
    }
    if let Err(reason) = listener.limits.check_flow(source, now) {
        refuse(stats, reason);
        return;
    }
    if flows.len() >= flows.capacity() {
        refuse(stats, RefuseReason::FlowTableFull);
        return;
    }
    let pool = &snapshot.pools[listener.pool];
    // A known token goes where its first flow went, while that backend is usable.
    let known = token
        .and_then(|hash| tokens.get(&hash, now))
        // Draining counts as usable: a returning player belongs to their
        // match until its server's drain timeout.
        .filter(|b| usable(b))
        .cloned();
    let backend = match known {
        Some(b) => b,
        None => {
            // The same selection as TCP connects and `ctl route`.
            let selection = match token {
                Some(hash) => crate::conn::select::select_hash(pool, client.ip(), hash, 4),
                None => crate::conn::select(pool, client, config.hash_key, 4),
            };
            let Some(selection) = selection else {
                refuse(stats, RefuseReason::NoBackend);
                return;
            };
            let Some(backend) = selection
                .candidates()
                .iter()
                .map(|&i| &pool.backends[i as usize])
                .find(|b| usable(b))
            else {
                refuse(stats, RefuseReason::NoBackend);
                return;
            };
            if let Some(hash) = token {
                // Replaces a stale entry; a full token table only loses the
                // memory of table changes (Maglev still agrees on the rest).
                tokens.remove(&hash);
                let _ = tokens.insert(hash, backend.clone(), now);
            }
            backend.clone()
        }
    };
    let transparent = (config.source == SourceMode::Client).then_some(client);
    let socket = match connect_udp(backend.addr, transparent).and_then(|s| poller.add(s.as_fd()).map(|()| s)) {
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
        backend,
        socket,
        stats: stats.clone(),
        token: token.unwrap_or(0),
        // One allocation per flow, only with the JSON access log on.
        log: crate::access_log::enabled().then(|| {
            Box::new(super::flow::FlowLog {
                listener: listener.config.clone(),
                client,
                opened: now,
                up: (1, data.len() as u64),
                down: (0, 0),
                end: "closed",
            })
        }),
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
