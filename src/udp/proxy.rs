//! The UDP data plane of one worker: flows, their backend sockets, replies.
//!
//! A datagram from a new client address opens a flow: the backend is chosen
//! by the pool's Maglev table on the flow key, and the flow gets its own
//! connected UDP socket toward that backend, so the backend's replies come
//! back on it and go to the client from the listener's address.
//!
//! This runs on the worker's UDP thread (a tokio current-thread runtime, on
//! both engines), not on its TCP loop. UDP reads are readiness-first: a
//! completion read parks its buffer until a datagram comes, and a datagram
//! can be 64 KiB, so a pending read per flow would pin 64 GiB at a million
//! flows; readiness reads only when data is there.
//!
//! Per listener and worker there are two tasks and no task per flow: one
//! reads client datagrams in bursts (recvmmsg) and forwards each on its
//! flow's socket; the other waits on one epoll set of all the flow sockets
//! ([`FlowPoller`]), reads the ready flows' replies and sends them to their
//! clients in bursts (sendmmsg). A million flows cost a million sockets and
//! table entries, not a million tasks. On the io_uring engine the forwards
//! of a burst, each on its own flow's socket, go to the kernel together on a
//! private ring ([`Forwarder`]): one syscall per burst instead of one per
//! datagram, measured at about 9% less CPU per packet (bench/README.md).

use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, RawFd};
use tokio::io::unix::AsyncFd;

use crate::stats::{ListenerStats, RefuseReason};
use crate::udp::flow::{connect_udp, usable, Flow};
use crate::udp::flow_poller::FlowPoller;
use crate::udp::flow_table::FlowTable;
use crate::udp::forwarder::Forwarder;
use crate::udp::mmsg::BATCH;
use crate::udp::recv_batch::RecvBatch;
use crate::udp::send_batch::SendBatch;
use crate::worker::{StopSignal, WorkerCtx};

/// Replies read per wake-up of the reply task before it lets the other tasks
/// of the worker (the listener's reads above all) run.
const REPLY_BUDGET: usize = 256;

/// A UDP listener's state on one worker.
struct UdpState {
    listener: tokio::net::UdpSocket,
    flows: RefCell<FlowTable<SocketAddr, Flow>>,
    /// The flow sockets, watched by the reply task.
    poller: AsyncFd<FlowPoller>,
    /// Flow socket descriptor -> client. An entry may be stale (its flow
    /// gone, the number reused); a reply is trusted only when the client's
    /// current flow still owns that descriptor. Bounded by the highest
    /// descriptor number, i.e. by RLIMIT_NOFILE.
    client_by_fd: RefCell<Vec<Option<SocketAddr>>>,
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
pub async fn udp_loop(ctx: Rc<WorkerCtx>, spec: UdpListenerSpec) {
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
    let poller = FlowPoller::new().and_then(|p| {
        // SAFETY: a FlowPoller owns its epoll descriptor for its whole life
        // and always reports that same descriptor.
        unsafe { AsyncFd::register_with_interest(p, tokio::io::Interest::READABLE) }.map_err(|e| e.into())
    });
    let poller = match poller {
        Ok(p) => p,
        Err(e) => {
            log::error!("worker {}: udp listener \"{name}\": flow epoll set: {e}", ctx.id);
            return;
        }
    };
    let state = Rc::new(UdpState {
        listener,
        flows: RefCell::new(FlowTable::new(max_flows, idle_timeout, Instant::now())),
        poller,
        client_by_fd: RefCell::new(Vec::new()),
        stats,
    });
    tokio::task::spawn_local(expire_loop(state.clone(), stop.clone()));
    tokio::task::spawn_local(reply_loop(state.clone(), stop.clone()));
    let mut batch = RecvBatch::default();
    let mut forwarder = Forwarder::new(ctx.io_uring, &ctx, &name);
    'serve: loop {
        tokio::select! {
            () = stop.wait() => break,
            ready = state.listener.readable() => if ready.is_err() { break },
        }
        // Drain what is queued before waiting again: one wake-up per burst,
        // up to BATCH datagrams per syscall.
        loop {
            let fd = state.listener.as_raw_fd();
            let mut last_burst = 0;
            let got = state.listener.try_io(tokio::io::Interest::READABLE, || {
                let n = batch.recv(fd)?;
                if n < BATCH {
                    // Fewer than asked: the queue is empty now. Report the
                    // socket as drained so the next wait sleeps until a new
                    // datagram (which raises a new edge) instead of paying
                    // a recvmmsg that only finds EAGAIN.
                    last_burst = n;
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match got {
                Ok(n) => relay_burst(&ctx, &state, slot, &batch, n, &mut forwarder),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    relay_burst(&ctx, &state, slot, &batch, last_burst, &mut forwarder);
                    break;
                }
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

/// Forwards the first `n` datagrams of a received burst.
fn relay_burst(
    ctx: &Rc<WorkerCtx>,
    state: &Rc<UdpState>,
    slot: usize,
    batch: &RecvBatch,
    n: usize,
    forwarder: &mut Forwarder,
) {
    for i in 0..n {
        if let Some((client, data)) = batch.get(i) {
            on_datagram(ctx, state, slot, client, data, forwarder);
        }
    }
    forwarder.finish(&mut state.flows.borrow_mut(), &state.stats);
}

/// Handles one client datagram: find or open its flow, forward it.
fn on_datagram(
    ctx: &Rc<WorkerCtx>,
    state: &Rc<UdpState>,
    slot: usize,
    client: SocketAddr,
    data: &[u8],
    forwarder: &mut Forwarder,
) {
    let now = Instant::now();
    let stats = &state.stats;
    stats.datagrams_in.inc();
    stats.bytes_in.add(data.len() as u64);
    let snapshot = ctx.snapshot();
    let Some(listener) = snapshot.listener(slot) else {
        return;
    };
    let source = listener.limits.source_key(client.ip());
    if let Err(reason) = listener.limits.check_packet(source, now) {
        // Refused under its real reason, and a datagram dropped all the same.
        stats.refuse(reason);
        stats.datagrams_dropped.inc();
        return;
    }
    let mut flows = state.flows.borrow_mut();
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
        forwarder.finish(&mut flows, stats);
        flows.remove(&client);
    }
    if let Err(reason) = listener.limits.check_flow(source, now) {
        stats.refuse(reason);
        stats.datagrams_dropped.inc();
        return;
    }
    let pool = &snapshot.pools[listener.pool];
    // The same selection as TCP connects and `ctl route`.
    let Some(selection) = crate::conn::select(pool, client, listener.config.hash_key, 4) else {
        stats.refuse(RefuseReason::NoBackend);
        return;
    };
    if flows.len() >= flows.capacity() {
        stats.refuse(RefuseReason::FlowTableFull);
        return;
    }
    let Some(backend) = selection
        .candidates()
        .iter()
        .map(|&i| &pool.backends[i as usize])
        .find(|b| usable(b))
    else {
        stats.refuse(RefuseReason::NoBackend);
        return;
    };
    let socket = match connect_udp(backend.addr).and_then(|s| state.poller.get_ref().add(s.as_raw_fd()).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            log::debug!("udp flow {client} -> {}: {e}", backend.addr);
            stats.refuse(RefuseReason::Overloaded);
            return;
        }
    };
    let fd = socket.as_raw_fd();
    stats.active.opened.inc();
    backend.stats.conns.opened.inc();
    let flow = Flow {
        backend: backend.clone(),
        socket,
        stats: stats.clone(),
    };
    let Ok(flow) = flows.insert(client, flow, now) else {
        stats.refuse(RefuseReason::FlowTableFull);
        return;
    };
    stats.accepted.inc();
    let mut by_fd = state.client_by_fd.borrow_mut();
    let slot = fd as usize;
    if by_fd.len() <= slot {
        by_fd.resize(slot + 1, None);
    }
    by_fd[slot] = Some(client);
    // SAFETY: as above: the batch and this new flow outlive the burst's `finish`.
    unsafe { forwarder.forward(flow, client, stats, data) };
}

/// Relays every flow's replies to its client until the listener stops: wait
/// for the epoll set of flow sockets, read one datagram from each ready flow,
/// send the burst through the listener socket, repeat until none is ready.
///
/// The reads stay one recv(2) per reply even on io_uring: queued on a ring
/// like the forwards, they measured no cheaper (bench/README.md), while the
/// sends of a burst share one sendmmsg.
async fn reply_loop(state: Rc<UdpState>, stop: Arc<StopSignal>) {
    let mut batch = SendBatch::default();
    let mut ready = Vec::new();
    while !stop.is_stopped() {
        let mut guard = tokio::select! {
            () = stop.wait() => break,
            g = state.poller.readable() => match g {
                Ok(g) => g,
                Err(_) => break,
            },
        };
        let mut relayed = 0;
        while relayed < REPLY_BUDGET {
            match guard.try_io(|p| p.get_ref().ready(&mut ready)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    log::debug!("udp flow epoll set: {e}");
                    break;
                }
                // Nothing ready: readiness is cleared, wait again.
                Err(_would_block) => break,
            }
            for &fd in &ready {
                relayed += read_reply(&state, fd, &mut batch);
                if batch.is_full() {
                    send_replies(&state, &mut batch);
                }
            }
            send_replies(&state, &mut batch);
        }
        if relayed >= REPLY_BUDGET {
            drop(guard);
            tokio::task::yield_now().await;
        }
    }
}

/// Reads one datagram from the flow socket `fd` into the batch; returns how
/// many replies it queued (0 or 1).
fn read_reply(state: &UdpState, fd: RawFd, batch: &mut SendBatch) -> usize {
    let Some(client) = state.client_by_fd.borrow().get(fd as usize).copied().flatten() else {
        return 0;
    };
    let now = Instant::now();
    let mut flows = state.flows.borrow_mut();
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
fn send_replies(state: &UdpState, batch: &mut SendBatch) {
    if batch.is_empty() {
        return;
    }
    let done = batch.flush(state.listener.as_raw_fd());
    let stats = &state.stats;
    stats.datagrams_out.add(done.sent as u64);
    stats.bytes_out.add(done.bytes as u64);
    if done.dropped > 0 {
        stats.datagrams_dropped.add(done.dropped as u64);
    }
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
        // Dropping a flow closes its socket.
        expired.clear();
    }
}
