//! The io_uring engine: one ring and one completion loop per worker, on the
//! io-uring crate, driving the sans-io connection core.
//!
//! Each loop turn is one `io_uring_enter` that submits everything queued
//! and waits for at least one completion (or the next timer): accepts are
//! multishot, receives take provided buffers only when data arrives,
//! sends, shutdowns, closes and cancels are queued SQEs, and a backend
//! connect is linked to a timeout the kernel enforces. The ring is set up
//! `SINGLE_ISSUER | DEFER_TASKRUN` (completions are run only when the
//! worker waits, in one batch), falling back to `COOP_TASKRUN` on kernels
//! without it.
//!
//! The zero-copy relay (`splice`, and `auto` once a direction moves bulk
//! data) waits for readiness on the ring (`PollAdd`) and then moves bytes
//! with non-blocking splice(2) calls: io_uring's own SPLICE op always runs
//! on an io-wq kernel thread, which costs more than it saves here.

mod buf_ring;

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::conn::{Conn, Data, Errno, Op, Side, Via};
use crate::fd_reserve::FdReserve;
use crate::udp::proxy::UdpListener;
use crate::worker::context::{Shared, WorkerCmd, WorkerInbox};

use super::driver::{check_close, drive, fire_timers, ConnSlot, Driver, Immediate, Shell};
use super::listener::{accept_client, TcpListener};
use super::pipe::{Pipe, PipePool, SPLICE_CHUNK};
use super::slab::Slab;
use super::sockets::{errno, reset_on_close, set_nodelay, tcp_socket, transparent_source};
use super::token::{Kind, Token};
use buf_ring::BufRing;

/// Submission queue entries per worker ring.
const SQ_ENTRIES: u32 = 2048;
/// Completion queue entries: room for every op of a full SQ several times
/// over, so the CQ does not overflow in practice (the kernel keeps
/// overflowed completions anyway: IORING_FEAT_NODROP).
const CQ_ENTRIES: u32 = 16384;
/// Provided buffers per worker and their size: a connection holds one only
/// while a chunk read from it is being sent on.
const BUFFERS: u16 = 1024;
/// Size of each provided buffer.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Buffer group id of the receive buffers.
const BUFFER_GROUP: u16 = 1;

/// How the worker's ring was set up, for the startup log and `ctl status`.
pub fn describe_flags(defer_taskrun: bool) -> &'static str {
    if defer_taskrun {
        "SINGLE_ISSUER|DEFER_TASKRUN"
    } else {
        "SINGLE_ISSUER|COOP_TASKRUN"
    }
}

/// A proxied connection's sockets and buffers, around its machine.
pub(crate) struct Slot {
    conn: Conn,
    client: Option<OwnedFd>,
    backend: Option<OwnedFd>,
    /// Where the connect goes (the kernel reads it when the op runs).
    backend_addr: socket2::SockAddr,
    /// The connect's linked timeout (read when the SQE is submitted).
    connect_timeout: types::Timespec,
    /// Buffer held per direction (indexed by source side) and its length.
    buffer: [Option<u16>; 2],
    /// Pipe per direction in splice mode.
    pipe: [Option<Pipe>; 2],
    /// A receive waits for a free provided buffer.
    starved: [bool; 2],
    /// The deadline armed in the wheel, if any.
    armed: Option<Instant>,
}

impl Slot {
    fn fd(&self, side: Side) -> RawFd {
        match side {
            Side::Client => self.client.as_ref(),
            Side::Backend => self.backend.as_ref(),
        }
        .map_or(-1, |f| f.as_raw_fd())
    }
}

/// One worker's io_uring loop.
pub struct RingWorker {
    // Dropped first: unregistering the ring happens before the buffer
    // memory it reads goes away.
    ring: IoUring,
    bufs: BufRing,
    id: usize,
    shared: Arc<Shared>,
    inbox: WorkerInbox,
    conns: Slab<Slot>,
    listeners: Vec<Option<TcpListener>>,
    udp: Slab<UdpListener>,
    driver: Driver,
    pipes: PipePool,
    fd_reserve: FdReserve,
    cqes: Vec<(u64, i32, u32)>,
    /// Receives waiting for a provided buffer, oldest first.
    starved: VecDeque<(u32, u32, Side)>,
    /// The waker's eventfd counter is read into this (stable address).
    waker_buf: Box<u64>,
    /// Pending commands were seen.
    woken: bool,
    defer_taskrun: bool,
    /// Set `TCP_NODELAY` with an SQE linked before the connect (kernel
    /// 6.7+); cleared, for a syscall, the first time the kernel refuses it.
    sockopt_on_ring: bool,
}

/// The value `TCP_NODELAY` is set to (read by the kernel when the SQE runs).
static ONE: libc::c_int = 1;

impl ConnSlot for Slot {
    fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    fn armed(&mut self) -> &mut Option<Instant> {
        &mut self.armed
    }
}

impl Shell for RingWorker {
    type Slot = Slot;

    fn parts(&mut self) -> (&mut Slab<Slot>, &mut Driver) {
        (&mut self.conns, &mut self.driver)
    }

    fn execute(&mut self, index: u32, gen: u32, op: Op) {
        RingWorker::execute(self, index, gen, op)
    }
}

impl RingWorker {
    /// Sets up the ring, its buffers and its waker read.
    pub fn new(id: usize, shared: Arc<Shared>, inbox: WorkerInbox) -> std::io::Result<RingWorker> {
        let build = |defer: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(CQ_ENTRIES).setup_single_issuer().setup_submit_all();
            if defer {
                b.setup_defer_taskrun();
            } else {
                b.setup_coop_taskrun();
            }
            b.build(SQ_ENTRIES)
        };
        let (ring, defer_taskrun) = match build(true) {
            Ok(r) => (r, true),
            Err(_) => (build(false)?, false),
        };
        let bufs = BufRing::new(&ring, BUFFERS, BUFFER_SIZE, BUFFER_GROUP)?;
        let mut w = RingWorker {
            ring,
            bufs,
            id,
            shared,
            inbox,
            conns: Slab::default(),
            listeners: Vec::new(),
            udp: Slab::default(),
            driver: Driver::new(Instant::now()),
            pipes: PipePool::default(),
            fd_reserve: FdReserve::new(1),
            cqes: Vec::with_capacity(1024),
            starved: VecDeque::new(),
            waker_buf: Box::new(0),
            woken: true,
            defer_taskrun,
            sockopt_on_ring: true,
        };
        w.arm_waker();
        Ok(w)
    }

    /// The setup flags in use.
    pub fn flags(&self) -> &'static str {
        describe_flags(self.defer_taskrun)
    }

    /// Runs the loop until the process exits.
    pub fn run(mut self) {
        loop {
            let now = Instant::now();
            if self.woken {
                self.woken = false;
                self.handle_commands(now);
            }
            self.resume_listeners(now);
            fire_timers(&mut self, now);
            self.expire_udp(now);
            self.wait(now);
            self.reap();
        }
    }

    /// Submits what is queued and waits for a completion or the next timer.
    fn wait(&mut self, now: Instant) {
        let next = [
            self.driver.wheel.next_due(),
            self.listeners.iter().flatten().filter_map(|l| l.resume_at).min(),
            self.udp.iter().map(|u| u.next_expiry()).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        let res = match next {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t.saturating_duration_since(now));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        if let Err(e) = res {
            if !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) {
                log::error!("worker {}: io_uring_enter: {e}", self.id);
            }
        }
    }

    /// Handles every completion that is ready.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        let now = Instant::now();
        for &(data, res, flags) in &cqes {
            self.complete(Token(data), res, flags, now);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// Queues one SQE, submitting first when the queue is full.
    fn push(&mut self, sqes: &[squeue::Entry]) {
        loop {
            // SAFETY: every SQE built here points only at memory that stays
            // valid until its completion: provided buffers (the BufRing
            // mapping), fields of a connection's heap cell (its slab slot
            // lives until Close, which waits for every op), and the
            // waker's boxed counter.
            if unsafe { self.ring.submission().push_multiple(sqes) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                log::error!("worker {}: io_uring submit: {e}", self.id);
                return;
            }
        }
    }

    fn arm_waker(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.inbox.waker.as_fd().as_raw_fd()),
            (&mut *self.waker_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(Token::new(Kind::Waker, 0, 0).0);
        self.push(&[sqe]);
    }

    fn handle_commands(&mut self, now: Instant) {
        while let Some(cmd) = self.inbox.try_recv() {
            match cmd {
                WorkerCmd::ListenTcp {
                    slot,
                    name,
                    socket,
                    stop,
                } => {
                    stop.register(self.inbox.waker.clone());
                    if let Err(e) = socket.set_nonblocking(true) {
                        log::error!("worker {}: listener \"{name}\": {e}", self.id);
                        continue;
                    }
                    let index = self.listeners.len();
                    self.listeners
                        .push(Some(TcpListener::new(slot, name, socket.into(), stop)));
                    self.arm_accept(index);
                }
                WorkerCmd::ListenUdp(spec) => {
                    spec.stop.register(self.inbox.waker.clone());
                    let name = spec.name.clone();
                    match UdpListener::new(self.id, true, spec, now) {
                        Ok(u) => {
                            let (i, g) = self.udp.insert(u);
                            self.arm_udp(i, g, Kind::UdpIn);
                            self.arm_udp(i, g, Kind::UdpReplies);
                        }
                        Err(e) => log::error!("worker {}: udp listener \"{name}\": {e}", self.id),
                    }
                }
                WorkerCmd::CheckClose => {
                    let force = self.shared.force_close.load(Ordering::Relaxed);
                    check_close(self, force);
                }
            }
        }
        let handed_over = self.shared.handed_over.load(Ordering::Relaxed);
        for (i, g) in self.udp.keys() {
            let Some(u) = self.udp.get_mut(i, g).filter(|u| u.stop.is_stopped() && !u.draining) else {
                continue;
            };
            if handed_over && u.flow_count() > 0 {
                // Handed over: the new process reads the socket now; this one
                // answers its flows until they go idle (see expire_udp).
                u.draining = true;
                self.cancel_udp(i, g, &[Kind::UdpIn]);
                continue;
            }
            self.remove_udp(i, g);
        }
        for index in 0..self.listeners.len() {
            let Some(l) = &mut self.listeners[index] else { continue };
            if l.stop.is_stopped() && !l.stopping {
                l.stopping = true;
                let fd = l.fd.as_raw_fd();
                let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                    .build()
                    .user_data(Token::new(Kind::Ignore, 0, 0).0);
                self.push(&[cancel]);
                if self.listeners[index].as_ref().is_some_and(|l| l.resume_at.is_some()) {
                    // No accept in flight: close it now.
                    self.close_listener(index);
                }
            }
        }
    }

    /// Waits (once) for a UDP listener's socket, or its flows' epoll set,
    /// to be readable. Re-armed after each burst; a socket still readable
    /// then completes at once, so a budget cut short loses nothing.
    fn arm_udp(&mut self, index: u32, gen: u32, kind: Kind) {
        let Some(u) = self.udp.get_mut(index, gen) else { return };
        // The raw number goes into the SQE; the listener (and so the
        // descriptor) lives in the slab until the loop removes it, after
        // which a late completion finds no entry.
        let fd = if kind == Kind::UdpIn {
            u.listener_fd()
        } else {
            u.poller_fd()
        }
        .as_raw_fd();
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(Token::new(kind, index, gen).0);
        self.push(&[sqe]);
    }

    fn expire_udp(&mut self, now: Instant) {
        for u in self.udp.iter_mut() {
            if u.next_expiry() <= now {
                u.expire(now);
            }
        }
        let force = self.shared.force_close.load(Ordering::Relaxed);
        // Only after a handover is any listener draining: no list is built otherwise.
        let done = |u: &mut UdpListener| u.draining && (u.flow_count() == 0 || force);
        if !self.udp.iter_mut().any(done) {
            return;
        }
        for (i, g) in self.udp.keys() {
            if self.udp.get_mut(i, g).is_some_and(done) {
                self.remove_udp(i, g);
            }
        }
    }

    /// Cancels a UDP listener's polls of `kinds`. By op, not by descriptor:
    /// the polls hold their files until cancelled.
    fn cancel_udp(&mut self, i: u32, g: u32, kinds: &[Kind]) {
        for &kind in kinds {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(Token::new(kind, i, g).0))
                .build()
                .user_data(Token::new(Kind::Ignore, 0, 0).0);
            self.push(&[cancel]);
        }
    }

    /// Ends a UDP listener on this worker: its polls cancelled, its
    /// descriptors (listener, flows) closed.
    fn remove_udp(&mut self, i: u32, g: u32) {
        self.cancel_udp(i, g, &[Kind::UdpIn, Kind::UdpReplies]);
        self.udp.remove(i);
    }

    fn arm_accept(&mut self, index: usize) {
        let Some(l) = &self.listeners[index] else { return };
        let sqe = opcode::AcceptMulti::new(types::Fd(l.fd.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::new(Kind::Accept, index as u32, 0).0);
        self.push(&[sqe]);
    }

    fn close_listener(&mut self, index: usize) {
        if let Some(l) = self.listeners[index].take() {
            log::debug!("worker {}: listener \"{}\" stopped accepting", self.id, l.name);
        }
    }

    fn resume_listeners(&mut self, now: Instant) {
        for index in 0..self.listeners.len() {
            let due = self.listeners[index]
                .as_ref()
                .is_some_and(|l| l.resume_at.is_some_and(|t| t <= now));
            if due {
                let l = self.listeners[index].as_mut().expect("checked");
                l.resume_at = None;
                if l.stopping {
                    self.close_listener(index);
                } else {
                    self.arm_accept(index);
                }
            }
        }
    }

    fn complete(&mut self, t: Token, res: i32, flags: u32, now: Instant) {
        match t.kind() {
            Kind::Ignore => {}
            Kind::Waker => {
                self.woken = true;
                self.arm_waker();
            }
            Kind::Accept => self.accepted(t.index() as usize, res, flags, now),
            Kind::UdpIn | Kind::UdpReplies => {
                let (index, gen, kind) = (t.index(), t.gen(), t.kind());
                let Some(u) = self.udp.get_mut(index, gen) else { return };
                if res < 0 && res != -libc::EINTR {
                    log::debug!("worker {}: udp listener \"{}\": poll: {}", self.id, u.name, Errno(-res));
                    return;
                }
                if kind == Kind::UdpIn {
                    if u.draining {
                        // Completed before its cancel: the socket is the new process's.
                        return;
                    }
                    u.on_readable(&self.shared.snapshot.load());
                } else {
                    u.on_replies();
                }
                self.arm_udp(index, gen, kind);
            }
            kind => {
                let (index, gen) = (t.index(), t.gen());
                let Some(slot) = self.conns.get_mut(index, gen) else {
                    return;
                };
                let result = if res < 0 { Err(Errno(-res)) } else { Ok(res as usize) };
                match kind {
                    Kind::SockOpt => {
                        // This kernel cannot set options on the ring: a
                        // syscall here, and from now on.
                        self.sockopt_on_ring = false;
                        log::debug!(
                            "worker {}: TCP_NODELAY on the ring: {}; using setsockopt(2)",
                            self.id,
                            Errno(-res)
                        );
                        if let Some(fd) = &slot.backend {
                            let _ = set_nodelay(fd);
                        }
                        return;
                    }
                    Kind::Connect => {
                        let r = result
                            .map(|_| ())
                            .map_err(|e| if e.0 == libc::ETIME { Errno::CANCELED } else { e });
                        slot.conn.on_connected(r, now, &mut self.driver.out);
                    }
                    Kind::RecvClient | Kind::RecvBackend => {
                        let side = if kind == Kind::RecvClient {
                            Side::Client
                        } else {
                            Side::Backend
                        };
                        if res == -libc::ENOBUFS {
                            // Every buffer is in use: wait for one to come back.
                            slot.starved[side as usize] = true;
                            self.starved.push_back((index, gen, side));
                            return;
                        }
                        if let Some(id) = cqueue::buffer_select(flags) {
                            slot.buffer[side as usize] = Some(id);
                        }
                        slot.conn
                            .on_received(side, result, self.bufs.size(), now, &mut self.driver.out);
                    }
                    Kind::SendClient | Kind::SendBackend => {
                        let side = if kind == Kind::SendClient {
                            Side::Client
                        } else {
                            Side::Backend
                        };
                        slot.conn.on_sent(side, result, now, &mut self.driver.out);
                    }
                    Kind::PollInClient | Kind::PollInBackend => {
                        let side = if kind == Kind::PollInClient {
                            Side::Client
                        } else {
                            Side::Backend
                        };
                        match result {
                            Err(e) => slot.conn.on_received(side, Err(e), 0, now, &mut self.driver.out),
                            Ok(_) => self.splice_in(index, gen, side),
                        }
                    }
                    Kind::PollOutClient | Kind::PollOutBackend => {
                        let side = if kind == Kind::PollOutClient {
                            Side::Client
                        } else {
                            Side::Backend
                        };
                        match result {
                            Err(e) => slot.conn.on_sent(side, Err(e), now, &mut self.driver.out),
                            Ok(_) => self.splice_out(index, gen, side),
                        }
                    }
                    _ => {}
                }
                drive(self, index, gen);
            }
        }
    }

    fn accepted(&mut self, index: usize, res: i32, flags: u32, now: Instant) {
        let more = cqueue::more(flags);
        if res >= 0 {
            // SAFETY: a successful accept CQE carries a new descriptor that
            // nobody else owns.
            let client = unsafe { OwnedFd::from_raw_fd(res) };
            let Some(l) = self.listeners.get(index).and_then(|l| l.as_ref()) else {
                return;
            };
            if let Some(conn) = accept_client(&self.shared, &self.fd_reserve, l, &client, now, &mut self.driver.out) {
                let (i, g) = self.conns.insert(Slot {
                    conn,
                    client: Some(client),
                    backend: None,
                    backend_addr: socket2::SockAddr::from(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                    connect_timeout: types::Timespec::new(),
                    buffer: [None, None],
                    pipe: [None, None],
                    starved: [false, false],
                    armed: None,
                });
                drive(self, i, g);
            } else {
                self.driver.out.clear();
            }
        }
        let Some(l) = self.listeners.get_mut(index).and_then(|l| l.as_mut()) else {
            return;
        };
        if more {
            return;
        }
        // The multishot accept ended: stopped, or an error such as EMFILE.
        if l.stopping || res == -libc::ECANCELED {
            self.close_listener(index);
            return;
        }
        if res < 0 {
            l.accept_failed(self.id, &self.shared, &self.fd_reserve, -res, now);
        }
        if l.resume_at.is_none() {
            self.arm_accept(index);
        }
    }

    fn execute(&mut self, index: u32, gen: u32, op: Op) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        match op {
            Op::Connect {
                addr,
                deadline,
                transparent_for,
            } => {
                let fd = match tcp_socket(addr).and_then(|fd| transparent_source(fd, addr, transparent_for)) {
                    Ok(fd) => fd,
                    Err(e) => {
                        self.driver
                            .immediate
                            .push_back(Immediate::Connected(Err(Errno(errno(&e)))));
                        return;
                    }
                };
                if !self.sockopt_on_ring {
                    if let Err(e) = set_nodelay(&fd) {
                        self.driver
                            .immediate
                            .push_back(Immediate::Connected(Err(Errno(errno(&e)))));
                        return;
                    }
                }
                slot.backend_addr = socket2::SockAddr::from(addr);
                slot.connect_timeout = types::Timespec::from(deadline.saturating_duration_since(Instant::now()));
                let raw = types::Fd(fd.as_raw_fd());
                let connect = opcode::Connect::new(raw, slot.backend_addr.as_ptr().cast(), slot.backend_addr.len())
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(Token::new(Kind::Connect, index, gen).0);
                let timeout = opcode::LinkTimeout::new(&slot.connect_timeout)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(Token::new(Kind::Ignore, index, gen).0);
                slot.backend = Some(fd);
                if self.sockopt_on_ring {
                    // Hard-linked: the connect runs whether or not it worked.
                    let nodelay = opcode::SetSockOpt::new(
                        raw,
                        libc::IPPROTO_TCP as u32,
                        libc::TCP_NODELAY as u32,
                        (&ONE as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as u32,
                    )
                    .build()
                    .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
                    .user_data(Token::new(Kind::SockOpt, index, gen).0);
                    self.push(&[nodelay, connect, timeout]);
                } else {
                    self.push(&[connect, timeout]);
                }
            }
            Op::CancelConnect => {
                let cancel =
                    opcode::AsyncCancel2::new(types::CancelBuilder::user_data(Token::new(Kind::Connect, index, gen).0))
                        .build()
                        .user_data(Token::new(Kind::Ignore, 0, 0).0);
                self.push(&[cancel]);
            }
            Op::Recv { from, via } => {
                if let Some(id) = slot.buffer[from as usize].take() {
                    self.give_buffer(id);
                }
                let Some(slot) = self.conns.get_mut(index, gen) else {
                    return;
                };
                match via {
                    Via::Buffer => {
                        let sqe = opcode::Recv::new(types::Fd(slot.fd(from)), std::ptr::null_mut(), BUFFER_SIZE as u32)
                            .buf_group(self.bufs.group())
                            .build()
                            .flags(squeue::Flags::BUFFER_SELECT)
                            .user_data(Token::new(recv_kind(from), index, gen).0);
                        self.push(&[sqe]);
                    }
                    Via::Preread => {
                        // Into the connection's own buffer: it lives in the
                        // machine (a stable heap allocation) until Close,
                        // which comes only after this receive completed.
                        let fd = types::Fd(slot.fd(from));
                        let space = slot.conn.preread_space();
                        let sqe = opcode::Recv::new(fd, space.as_mut_ptr(), space.len() as u32)
                            .build()
                            .user_data(Token::new(recv_kind(from), index, gen).0);
                        self.push(&[sqe]);
                    }
                    Via::Pipe => {
                        if slot.pipe[from as usize].is_none() {
                            match self.pipes.take() {
                                Ok(p) => slot.pipe[from as usize] = Some(p),
                                Err(e) => {
                                    self.driver.immediate.push_back(Immediate::Received(
                                        from,
                                        Err(Errno(errno(&e))),
                                        0,
                                    ));
                                    return;
                                }
                            }
                        }
                        // Data is usually there already (bulk): try first.
                        self.splice_in(index, gen, from);
                    }
                }
            }
            Op::Send { to, data, offset, len } => {
                let ptr = match data {
                    Data::Header => slot.conn.proxy_header()[offset..].as_ptr(),
                    // Held by the machine until this send completed.
                    Data::Preread => slot.conn.preread_unsent()[offset..].as_ptr(),
                    Data::Buffer => match slot.buffer[to.other() as usize] {
                        // SAFETY: offset < len <= the buffer's size.
                        Some(id) => unsafe { self.bufs.ptr(id).add(offset) },
                        None => {
                            debug_assert!(false, "send with no buffer");
                            self.driver
                                .immediate
                                .push_back(Immediate::Sent(to, Err(Errno(libc::EINVAL))));
                            return;
                        }
                    },
                    Data::Pipe => return self.splice_out_len(index, gen, to, len),
                };
                let sqe = opcode::Send::new(types::Fd(slot.fd(to)), ptr, len as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(Token::new(send_kind(to), index, gen).0);
                self.push(&[sqe]);
            }
            Op::ShutdownWrite(side) => {
                // A plain syscall, not an SQE: io_uring runs SHUTDOWN on an
                // io-wq thread, where it could still be waiting when the
                // connection's Close has run and the descriptor number has
                // gone to a new client.
                if let Some(fd) = match side {
                    Side::Client => &slot.client,
                    Side::Backend => &slot.backend,
                } {
                    let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Write);
                }
            }
            Op::Abort => {
                // Receives parked for a buffer are the shell's: end them here.
                for side in [Side::Client, Side::Backend] {
                    if std::mem::take(&mut slot.starved[side as usize]) {
                        self.driver
                            .immediate
                            .push_back(Immediate::Received(side, Err(Errno::CANCELED), 0));
                    }
                }
                let mut cancels = Vec::with_capacity(2);
                for fd in [slot.fd(Side::Client), slot.fd(Side::Backend)] {
                    if fd >= 0 {
                        cancels.push(
                            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                                .build()
                                .user_data(Token::new(Kind::Ignore, 0, 0).0),
                        );
                    }
                }
                self.push(&cancels);
            }
            Op::Close {
                reset_client,
                reset_backend,
            } => {
                let Some(mut slot) = self.conns.remove(index) else {
                    return;
                };
                for (fd, reset) in [(slot.client.take(), reset_client), (slot.backend.take(), reset_backend)] {
                    let Some(fd) = fd else { continue };
                    if reset {
                        reset_on_close(fd.as_fd());
                    }
                    let sqe = opcode::Close::new(types::Fd(fd.into_raw_fd()))
                        .build()
                        .flags(squeue::Flags::SKIP_SUCCESS)
                        .user_data(Token::new(Kind::Ignore, 0, 0).0);
                    self.push(&[sqe]);
                }
                for id in slot.buffer.iter_mut().filter_map(|b| b.take()) {
                    self.give_buffer(id);
                }
                for p in slot.pipe.iter_mut().filter_map(|p| p.take()) {
                    self.pipes.give(p);
                }
            }
        }
    }

    /// Moves what the socket has into the direction's pipe; waits for
    /// readiness on the ring when it has nothing yet.
    fn splice_in(&mut self, index: u32, gen: u32, from: Side) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        let fd = slot.fd(from);
        let socket = match from {
            Side::Client => slot.client.as_ref(),
            Side::Backend => slot.backend.as_ref(),
        }
        .map(AsFd::as_fd);
        let pipe = slot.pipe[from as usize].as_mut().expect("splice with a pipe");
        match pipe.fill_from(socket, SPLICE_CHUNK) {
            Ok(n) => self.driver.immediate.push_back(Immediate::Received(from, Ok(n), 0)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let sqe = opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
                    .build()
                    .user_data(Token::new(poll_in_kind(from), index, gen).0);
                self.push(&[sqe]);
            }
            Err(e) => self
                .driver
                .immediate
                .push_back(Immediate::Received(from, Err(Errno(errno(&e))), 0)),
        }
    }

    fn splice_out(&mut self, index: u32, gen: u32, to: Side) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        let len = slot.pipe[to.other() as usize].as_ref().map_or(0, |p| p.queued);
        self.splice_out_len(index, gen, to, len);
    }

    /// Moves bytes from the direction's pipe to `to`; waits for room on the
    /// ring when the socket's send buffer is full.
    fn splice_out_len(&mut self, index: u32, gen: u32, to: Side, len: usize) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        let fd = slot.fd(to);
        let socket = match to {
            Side::Client => slot.client.as_ref(),
            Side::Backend => slot.backend.as_ref(),
        }
        .map(AsFd::as_fd);
        let pipe = slot.pipe[to.other() as usize].as_mut().expect("splice with a pipe");
        match pipe.drain_to(socket, len) {
            Ok(n) => self.driver.immediate.push_back(Immediate::Sent(to, Ok(n))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                    .build()
                    .user_data(Token::new(poll_out_kind(to), index, gen).0);
                self.push(&[sqe]);
            }
            Err(e) => self
                .driver
                .immediate
                .push_back(Immediate::Sent(to, Err(Errno(errno(&e))))),
        }
    }

    /// Returns a buffer to the kernel and restarts one starved receive.
    fn give_buffer(&mut self, id: u16) {
        self.bufs.give(id);
        while let Some((index, gen, side)) = self.starved.pop_front() {
            let Some(slot) = self.conns.get_mut(index, gen) else {
                continue;
            };
            if !std::mem::take(&mut slot.starved[side as usize]) {
                continue;
            }
            let sqe = opcode::Recv::new(types::Fd(slot.fd(side)), std::ptr::null_mut(), BUFFER_SIZE as u32)
                .buf_group(self.bufs.group())
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(Token::new(recv_kind(side), index, gen).0);
            self.push(&[sqe]);
            break;
        }
    }
}

fn recv_kind(side: Side) -> Kind {
    match side {
        Side::Client => Kind::RecvClient,
        Side::Backend => Kind::RecvBackend,
    }
}

fn send_kind(side: Side) -> Kind {
    match side {
        Side::Client => Kind::SendClient,
        Side::Backend => Kind::SendBackend,
    }
}

fn poll_in_kind(side: Side) -> Kind {
    match side {
        Side::Client => Kind::PollInClient,
        Side::Backend => Kind::PollInBackend,
    }
}

fn poll_out_kind(side: Side) -> Kind {
    match side {
        Side::Client => Kind::PollOutClient,
        Side::Backend => Kind::PollOutBackend,
    }
}

/// Runs worker `id` on io_uring; returns only if the ring can't be set up.
pub fn run(id: usize, shared: Arc<Shared>, inbox: WorkerInbox) -> std::io::Result<()> {
    let worker = RingWorker::new(id, shared.clone(), inbox)?;
    let setup = format!(
        "{}, {BUFFERS} x {} KiB provided buffers",
        worker.flags(),
        BUFFER_SIZE / 1024
    );
    log::info!("worker {id} started on io_uring ({setup})");
    shared.set_worker_setup(id, setup);
    worker.run();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel sets `TCP_NODELAY` from the ring (the connect path relies
    /// on it, with a syscall fallback where it cannot).
    #[test]
    fn nodelay_set_on_the_ring_is_seen_by_getsockopt() {
        let mut ring = IoUring::new(8).unwrap();
        let fd = tcp_socket("127.0.0.1:1".parse().unwrap()).unwrap();
        let sqe = opcode::SetSockOpt::new(
            types::Fd(fd.as_raw_fd()),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            (&ONE as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
        .build()
        .user_data(7);
        // SAFETY: the option value is a static.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        if cqe.result() < 0 {
            eprintln!(
                "this kernel cannot set socket options on the ring ({}): the fallback is used",
                Errno(-cqe.result())
            );
            return;
        }
        assert!(socket2::SockRef::from(&fd).nodelay().unwrap());
    }
}
