//! The UDP data plane of one worker: flows, their backend sockets, replies.
//!
//! A datagram from a new client address opens a flow: the backend is chosen
//! by the pool's Maglev table on the flow key, and the flow gets its own
//! connected UDP socket toward that backend, so the backend's replies come
//! back on it and go to the client from the listener's address.
//!
//! UDP runs readiness-first on tokio's reactor on both engines (the io_uring
//! engine's runtime has the same reactor underneath):
//! - a completion read parks its buffer until a datagram comes, and a
//!   datagram can be 64 KiB, so a pending read per flow would pin 64 GiB at a
//!   million flows; readiness borrows a pooled buffer only when data is there;
//! - tokio-uring 0.5's `recv_from` panics when a read completes without a
//!   source address, which is exactly how a shut-down socket completes it,
//!   so a UDP listener on it could not be stopped cleanly on reload or exit;
//! - without multishot receive and provided buffers (which tokio-uring lacks)
//!   io_uring saves nothing per datagram over epoll + recvfrom/sendto.

use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::flow_key::flow_hash;
use crate::snapshot::Backend;
use crate::stats::{ListenerStats, RefuseReason};
use crate::udp::flow_table::FlowTable;
use crate::udp::recv_batch::RecvBatch;
use crate::worker::{StopSignal, WorkerCtx};
use std::os::fd::AsRawFd;

/// One client flow.
struct Flow {
    backend: Arc<Backend>,
    socket: Rc<tokio::net::UdpSocket>,
    /// Dropping it (flow expired or re-picked) ends the reply task.
    _closer: oneshot::Sender<()>,
}

/// A UDP listener's state on one worker.
struct UdpState {
    listener: tokio::net::UdpSocket,
    flows: RefCell<FlowTable<SocketAddr, Flow>>,
    stats: Arc<ListenerStats>,
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

/// Serves one UDP listener on this worker until its stop signal fires.
pub async fn udp_loop<E: Engine>(ctx: Rc<WorkerCtx>, spec: UdpListenerSpec) {
    let UdpListenerSpec {
        slot,
        name,
        socket: listener,
        stop,
        max_flows,
        idle_timeout,
        stats,
    } = spec;
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UdpSocket::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            log::error!("worker {}: udp listener \"{name}\": {e}", ctx.id);
            return;
        }
    };
    let state = Rc::new(UdpState {
        listener,
        flows: RefCell::new(FlowTable::new(max_flows, idle_timeout, Instant::now())),
        stats,
    });
    E::spawn(expire_loop(state.clone(), stop.clone()));
    let mut batch = RecvBatch::default();
    'serve: loop {
        tokio::select! {
            () = stop.wait() => break,
            ready = state.listener.readable() => if ready.is_err() { break },
        }
        // Drain what is queued before waiting again: one wake-up per burst,
        // up to BATCH datagrams per syscall.
        loop {
            let fd = state.listener.as_raw_fd();
            match state.listener.try_io(tokio::io::Interest::READABLE, || batch.recv(fd)) {
                Ok(n) => {
                    for i in 0..n {
                        if let Some((client, data)) = batch.get(i) {
                            on_datagram::<E>(&ctx, &state, slot, client, data);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("worker {}: udp listener \"{name}\": {e}", ctx.id);
                    if matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::ENOBUFS)) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if stop.is_stopped() {
                        break 'serve;
                    }
                    break;
                }
            }
        }
    }
    // The listener socket can no longer send replies: end every flow.
    state.flows.borrow_mut().retain(|_, _| false);
    log::debug!("worker {}: udp listener \"{name}\" stopped", ctx.id);
}

fn usable(backend: &Backend) -> bool {
    !backend.is_closing() && !backend.is_down()
}

/// Handles one client datagram: find or open its flow, forward it.
fn on_datagram<E: Engine>(ctx: &Rc<WorkerCtx>, state: &Rc<UdpState>, slot: usize, client: SocketAddr, data: &[u8]) {
    let now = Instant::now();
    let stats = &state.stats;
    stats.datagrams_in.inc();
    stats.bytes_in.add(data.len() as u64);
    let snapshot = ctx.snapshot();
    let Some(listener) = snapshot.listener(slot) else {
        return;
    };
    let source = listener.limits.source_key(client.ip());
    if !listener.limits.admit_packet(source, now) {
        stats.refuse(RefuseReason::RateLimited);
        return;
    }
    let mut flows = state.flows.borrow_mut();
    if let Some(flow) = flows.get(&client, now) {
        if usable(&flow.backend) {
            forward(flow, stats, data);
            return;
        }
        // Its backend is down, removed or past its drain: re-pick below.
        flows.remove(&client);
    }
    if !listener.limits.admit_flow(source, now) {
        stats.refuse(RefuseReason::RateLimited);
        return;
    }
    let pool = &snapshot.pools[listener.pool];
    let Some(table) = pool.table_for(client.ip()).0 else {
        stats.refuse(RefuseReason::NoBackend);
        return;
    };
    if flows.len() >= flows.capacity() {
        stats.refuse(RefuseReason::FlowTableFull);
        return;
    }
    let hash = flow_hash(client, listener.config.hash_key);
    let Some(backend) = table
        .candidates(hash, 4)
        .map(|i| &pool.backends[i as usize])
        .find(|b| usable(b))
    else {
        stats.refuse(RefuseReason::NoBackend);
        return;
    };
    let socket = match connect_udp(backend.addr) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            log::debug!("udp flow {client} -> {}: {e}", backend.addr);
            stats.refuse(RefuseReason::Overloaded);
            return;
        }
    };
    let (closer, closed) = oneshot::channel();
    let flow = Flow {
        backend: backend.clone(),
        socket: socket.clone(),
        _closer: closer,
    };
    let Ok(flow) = flows.insert(client, flow, now) else {
        stats.refuse(RefuseReason::FlowTableFull);
        return;
    };
    stats.accepted.inc();
    stats.active.opened.inc();
    backend.stats.conns.opened.inc();
    forward(flow, stats, data);
    E::spawn(reply_loop(
        ctx.clone(),
        state.clone(),
        client,
        socket,
        backend.clone(),
        closed,
    ));
}

fn connect_udp(backend: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket)
}

/// Sends a client datagram to the flow's backend without waiting: a full
/// socket buffer drops the datagram (UDP semantics) rather than stalling
/// every other flow of this worker. The send is a plain non-blocking
/// send(2): tokio's `try_send` would refuse until the reactor has seen the
/// new socket writable, dropping every flow's first datagram.
fn forward(flow: &Flow, stats: &ListenerStats, data: &[u8]) {
    match socket2::SockRef::from(flow.socket.as_ref()).send(data) {
        Ok(n) => flow.backend.stats.bytes_in.add(n as u64),
        Err(e) => {
            stats.datagrams_dropped.inc();
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                // ICMP port unreachable from an earlier datagram: a passive failure.
                flow.backend.connect_failed();
            }
        }
    }
}

/// Relays the backend's replies to the client until the flow ends.
async fn reply_loop(
    ctx: Rc<WorkerCtx>,
    state: Rc<UdpState>,
    client: SocketAddr,
    socket: Rc<tokio::net::UdpSocket>,
    backend: Arc<Backend>,
    mut closed: oneshot::Receiver<()>,
) {
    'flow: loop {
        tokio::select! {
            _ = &mut closed => break,
            ready = socket.readable() => if ready.is_err() { break },
        }
        loop {
            let mut buf = ctx.bufs.take(true);
            match socket.try_recv_buf(&mut buf) {
                Ok(n) => {
                    backend.connect_succeeded();
                    backend.stats.bytes_out.add(n as u64);
                    if !state.flows.borrow_mut().touch(&client, Instant::now()) {
                        ctx.bufs.give(buf);
                        break 'flow;
                    }
                    let res = state.listener.send_to(&buf, client).await;
                    ctx.bufs.give(buf);
                    match res {
                        Ok(_) => {
                            state.stats.datagrams_out.inc();
                            state.stats.bytes_out.add(n as u64);
                        }
                        Err(_) => state.stats.datagrams_dropped.inc(),
                    }
                }
                Err(e) => {
                    ctx.bufs.give(buf);
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        break;
                    }
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        backend.connect_failed();
                        break;
                    }
                    break 'flow;
                }
            }
        }
    }
    state.stats.active.closed.inc();
    backend.stats.conns.closed.inc();
}

/// Closes idle flows; the table's timer wheel makes this proportional to the
/// flows that expire, not to all flows.
async fn expire_loop(state: Rc<UdpState>, stop: Arc<StopSignal>) {
    let mut expired = Vec::new();
    while !stop.is_stopped() {
        let now = Instant::now();
        let next = state
            .flows
            .borrow()
            .next_deadline()
            .unwrap_or(now + Duration::from_secs(1));
        let wake = next.clamp(now + Duration::from_millis(5), now + Duration::from_secs(1));
        tokio::time::sleep_until(wake.into()).await;
        state.flows.borrow_mut().expire(Instant::now(), &mut expired);
        // Dropping a flow drops its closer, which ends its reply task and closes its socket.
        expired.clear();
    }
}
