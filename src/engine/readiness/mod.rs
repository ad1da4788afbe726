//! The epoll engine: one edge-triggered readiness loop per worker, driving
//! the same connection core as the io_uring engine. It is the fallback
//! where io_uring is blocked (seccomp profiles, `io_uring_disabled`).
//!
//! Sockets are added to the epoll set once, edge-triggered, for both
//! directions; the loop keeps each socket's "readable" and "writable" state
//! and only calls recv/send/splice when the kernel said it may succeed. A
//! read shorter than the buffer means the socket is drained (HAProxy's
//! rule), so request/response traffic pays no read that finds EAGAIN.
//! Sends are tried at once and only wait for EPOLLOUT when the socket's
//! buffer is full.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Conn, Data, Errno, Op, Side, Via};
use crate::fd_reserve::FdReserve;
use crate::proxy::buffers::BufPool;
use crate::udp::proxy::UdpListener;
use crate::worker::context::{Shared, WorkerCmd, WorkerInbox};

use super::driver::{check_close, drive, fire_timers, ConnSlot, Driver, Immediate, Shell};
use super::listener::{accept_client, TcpListener};
use super::pipe::{Pipe, PipePool, SPLICE_CHUNK};
use super::slab::Slab;
use super::sockets::{backend_socket, errno, reset_on_close, transparent_source};
use super::token::{Kind, Token};

/// Events read per epoll_wait.
const EVENTS: usize = 256;
/// Clients accepted per listener per loop turn (the rest wait a turn, so
/// one busy listener cannot starve established connections).
const ACCEPT_BATCH: usize = 64;

/// A proxied connection's sockets and readiness, around its machine.
pub(crate) struct Slot {
    conn: Conn,
    fds: [Option<OwnedFd>; 2],
    /// The kernel said the socket may have data / room (cleared on EAGAIN
    /// or a short read).
    readable: [bool; 2],
    writable: [bool; 2],
    /// The peer's FIN (EPOLLRDHUP) or an error was reported: the socket
    /// stays readable until a read returns 0 or fails.
    hup: [bool; 2],
    /// A receive asked for by the machine, waiting for readiness.
    want_recv: [Option<Via>; 2],
    /// A send asked for by the machine, waiting for room: data, offset, len.
    want_send: [Option<(Data, usize, usize)>; 2],
    /// The backend connect is in progress.
    connecting: bool,
    /// Buffer per direction (by source side) holding its current chunk.
    buffer: [Option<Vec<u8>>; 2],
    pipe: [Option<Pipe>; 2],
    armed: Option<Instant>,
}

impl Slot {
    fn fd(&self, side: Side) -> RawFd {
        self.fds[side as usize].as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

/// One worker's epoll loop.
struct EpollWorker {
    epoll: OwnedFd,
    id: usize,
    shared: Arc<Shared>,
    inbox: WorkerInbox,
    conns: Slab<Slot>,
    listeners: Vec<Option<TcpListener>>,
    udp: Slab<UdpListener>,
    /// Listeners with clients left over from the last batch.
    accept_ready: Vec<usize>,
    driver: Driver,
    bufs: BufPool,
    pipes: PipePool,
    fd_reserve: FdReserve,
}

fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: BorrowedFd<'_>, events: u32, token: Token) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token.0 };
    // SAFETY: epoll_ctl on our epoll fd and a descriptor borrowed for the
    // call, with a live event struct.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const SOCKET_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

impl ConnSlot for Slot {
    fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    fn armed(&mut self) -> &mut Option<Instant> {
        &mut self.armed
    }
}

impl Shell for EpollWorker {
    type Slot = Slot;

    fn parts(&mut self) -> (&mut Slab<Slot>, &mut Driver) {
        (&mut self.conns, &mut self.driver)
    }

    fn execute(&mut self, index: u32, gen: u32, op: Op) {
        EpollWorker::execute(self, index, gen, op)
    }
}

impl EpollWorker {
    fn new(id: usize, shared: Arc<Shared>, inbox: WorkerInbox) -> std::io::Result<EpollWorker> {
        // SAFETY: epoll_create1 with a valid flag; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        epoll_ctl(
            &epoll,
            libc::EPOLL_CTL_ADD,
            inbox.waker.as_fd(),
            libc::EPOLLIN as u32,
            Token::new(Kind::Waker, 0, 0),
        )?;
        Ok(EpollWorker {
            epoll,
            id,
            shared,
            inbox,
            conns: Slab::default(),
            listeners: Vec::new(),
            udp: Slab::default(),
            accept_ready: Vec::new(),
            driver: Driver::new(Instant::now()),
            bufs: BufPool::default(),
            pipes: PipePool::default(),
            fd_reserve: FdReserve::new(1),
        })
    }

    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut woken = true;
        loop {
            let now = Instant::now();
            if woken {
                woken = false;
                self.handle_commands(now);
            }
            self.resume_listeners(now);
            fire_timers(&mut self, now);
            for u in self.udp.iter_mut() {
                if u.next_expiry() <= now {
                    u.expire(now);
                }
            }
            let force = self.shared.force_close.load(Ordering::Relaxed);
            // Only after a handover is any listener draining: no list is built otherwise.
            let done = |u: &mut UdpListener| u.draining && (u.flow_count() == 0 || force);
            if self.udp.iter_mut().any(done) {
                for (i, g) in self.udp.keys() {
                    if self.udp.get_mut(i, g).is_some_and(done) {
                        // Its flows' epoll set closes with it.
                        self.udp.remove(i);
                    }
                }
            }
            for index in std::mem::take(&mut self.accept_ready) {
                self.accept_batch(index, now);
            }
            let timeout = if !self.accept_ready.is_empty() {
                0
            } else {
                let next = [
                    self.driver.wheel.next_due(),
                    self.listeners.iter().flatten().filter_map(|l| l.resume_at).min(),
                    self.udp.iter().map(|u| u.next_expiry()).min(),
                ]
                .into_iter()
                .flatten()
                .min();
                match next {
                    None => -1,
                    // Round up: waking a little late is fine, early spins.
                    Some(t) => t.saturating_duration_since(now).as_millis().min(i32::MAX as u128) as i32 + 1,
                }
            };
            // SAFETY: epoll_wait writes at most `EVENTS` entries into the buffer.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), EVENTS as i32, timeout) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("worker {}: epoll_wait: {e}", self.id);
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            let now = Instant::now();
            for ev in &events[..n as usize] {
                let (flags, t) = (ev.events, Token(ev.u64));
                match t.kind() {
                    Kind::Waker => {
                        self.inbox.waker.reset();
                        woken = true;
                    }
                    Kind::Accept => self.accept_batch(t.index() as usize, now),
                    Kind::RecvClient => self.socket_ready(t, Side::Client, flags, now),
                    Kind::RecvBackend => self.socket_ready(t, Side::Backend, flags, now),
                    // Level-triggered: a burst cut short by its budget is
                    // reported again on the next wait.
                    Kind::UdpIn => {
                        if let Some(u) = self.udp.get_mut(t.index(), t.gen()) {
                            u.on_readable(&self.shared.snapshot.load());
                        }
                    }
                    Kind::UdpReplies => {
                        if let Some(u) = self.udp.get_mut(t.index(), t.gen()) {
                            u.on_replies();
                        }
                    }
                    _ => {}
                }
            }
        }
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
                    let fd: OwnedFd = socket.into();
                    if let Err(e) = epoll_ctl(
                        &self.epoll,
                        libc::EPOLL_CTL_ADD,
                        fd.as_fd(),
                        libc::EPOLLIN as u32,
                        Token::new(Kind::Accept, index as u32, 0),
                    ) {
                        log::error!("worker {}: listener \"{name}\": {e}", self.id);
                        continue;
                    }
                    self.listeners.push(Some(TcpListener::new(slot, name, fd, stop)));
                }
                WorkerCmd::ListenUdp(spec) => {
                    spec.stop.register(self.inbox.waker.clone());
                    let name = spec.name.clone();
                    if let Err(e) = self.add_udp(spec, now) {
                        log::error!("worker {}: udp listener \"{name}\": {e}", self.id);
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
            if let Some(u) = self.udp.get_mut(i, g).filter(|u| u.stop.is_stopped() && !u.draining) {
                // Taken out of the epoll set explicitly: closing the
                // descriptor does not do it while another process holds the
                // same socket (an upgrade handed it over), and this
                // level-triggered registration would then fire for ever.
                let fd = u.listener_fd();
                let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, Token(0));
                if handed_over && u.flow_count() > 0 {
                    // The new process reads the socket now; this one answers
                    // its flows until they go idle (removed after expiry).
                    u.draining = true;
                } else {
                    self.udp.remove(i);
                }
            }
        }
        for l in &mut self.listeners {
            if l.as_ref().is_some_and(|l| l.stop.is_stopped()) {
                let l = l.take().expect("checked");
                // As above: the socket may live on in the process it was handed to.
                let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, l.fd.as_fd(), 0, Token(0));
                log::debug!("worker {}: listener \"{}\" stopped accepting", self.id, l.name);
            }
        }
    }

    fn add_udp(&mut self, spec: crate::worker::UdpListenerSpec, now: Instant) -> std::io::Result<()> {
        let u = UdpListener::new(self.id, false, spec, now)?;
        let (i, g) = self.udp.insert(u);
        let u = self.udp.get_mut(i, g).expect("just inserted");
        let added = epoll_ctl(
            &self.epoll,
            libc::EPOLL_CTL_ADD,
            u.listener_fd(),
            libc::EPOLLIN as u32,
            Token::new(Kind::UdpIn, i, g),
        )
        .and_then(|()| {
            epoll_ctl(
                &self.epoll,
                libc::EPOLL_CTL_ADD,
                u.poller_fd(),
                libc::EPOLLIN as u32,
                Token::new(Kind::UdpReplies, i, g),
            )
        });
        if added.is_err() {
            self.udp.remove(i);
        }
        added
    }

    fn resume_listeners(&mut self, now: Instant) {
        for index in 0..self.listeners.len() {
            if let Some(l) = &mut self.listeners[index] {
                if l.resume_at.is_some_and(|t| t <= now) {
                    l.resume_at = None;
                    self.accept_ready.push(index);
                }
            }
        }
    }

    fn accept_batch(&mut self, index: usize, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = self.listeners.get_mut(index).and_then(|l| l.as_mut()) else {
                return;
            };
            if l.resume_at.is_some() {
                return;
            }
            // SAFETY: accept4 on our listening socket; a new fd is owned below.
            let fd = unsafe {
                libc::accept4(
                    l.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = errno(&std::io::Error::last_os_error());
                if e != libc::EAGAIN && e != libc::EINTR && e != libc::ECONNABORTED {
                    l.accept_failed(self.id, &self.shared, &self.fd_reserve, e, now);
                }
                return;
            }
            // SAFETY: accept4 returned a new descriptor nobody else owns.
            let client = unsafe { OwnedFd::from_raw_fd(fd) };
            let Some(conn) = accept_client(&self.shared, &self.fd_reserve, l, &client, now, &mut self.driver.out)
            else {
                self.driver.out.clear();
                continue;
            };
            let (i, g) = self.conns.insert(Slot {
                conn,
                fds: [Some(client), None],
                readable: [false; 2],
                writable: [true, false],
                hup: [false; 2],
                want_recv: [None; 2],
                want_send: [None; 2],
                connecting: false,
                buffer: [None, None],
                pipe: [None, None],
                armed: None,
            });
            let slot = self.conns.get_mut(i, g).expect("just inserted");
            if !slot.conn.is_finished() || !self.driver.out.is_empty() {
                let fd = slot.fds[Side::Client as usize].as_ref().expect("just accepted").as_fd();
                if let Err(e) = epoll_ctl(
                    &self.epoll,
                    libc::EPOLL_CTL_ADD,
                    fd,
                    SOCKET_EVENTS,
                    Token::new(Kind::RecvClient, i, g),
                ) {
                    log::warn!("worker {}: epoll add: {e}", self.id);
                }
            }
            drive(self, i, g);
        }
        // More may be waiting: continue next turn, after other events.
        self.accept_ready.push(index);
    }

    /// A socket of a connection reported readiness.
    fn socket_ready(&mut self, t: Token, side: Side, flags: u32, now: Instant) {
        let (index, gen) = (t.index(), t.gen());
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        let err = flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0 || err {
            slot.readable[side as usize] = true;
        }
        if flags & libc::EPOLLRDHUP as u32 != 0 || err {
            slot.hup[side as usize] = true;
        }
        if flags & libc::EPOLLOUT as u32 != 0 || err {
            slot.writable[side as usize] = true;
        }
        if side == Side::Backend && slot.connecting && slot.writable[1] {
            slot.connecting = false;
            let sock = socket2::SockRef::from(slot.fds[1].as_ref().expect("connecting has a socket"));
            let r = match sock.take_error() {
                Ok(None) => Ok(()),
                Ok(Some(e)) => Err(Errno(errno(&e))),
                Err(e) => Err(Errno(errno(&e))),
            };
            slot.conn.on_connected(r, now, &mut self.driver.out);
            drive(self, index, gen);
        }
        self.progress(index, gen, side);
        drive(self, index, gen);
    }

    /// Runs the receive and send of `side` that wait for readiness it now has.
    fn progress(&mut self, index: u32, gen: u32, side: Side) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        if slot.readable[side as usize] {
            if let Some(via) = slot.want_recv[side as usize].take() {
                self.try_recv(index, gen, side, via);
            }
        }
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        if slot.writable[side as usize] {
            if let Some((data, offset, len)) = slot.want_send[side as usize].take() {
                self.try_send(index, gen, side, data, offset, len);
            }
        }
    }

    fn execute(&mut self, index: u32, gen: u32, op: Op) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        match op {
            Op::Connect {
                addr, transparent_for, ..
            } => {
                let fd = match backend_socket(addr).and_then(|fd| transparent_source(fd, addr, transparent_for)) {
                    Ok(fd) => fd,
                    Err(e) => {
                        return self
                            .driver
                            .immediate
                            .push_back(Immediate::Connected(Err(Errno(errno(&e)))))
                    }
                };
                match socket2::SockRef::from(&fd).connect(&addr.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => {
                        return self
                            .driver
                            .immediate
                            .push_back(Immediate::Connected(Err(Errno(errno(&e)))))
                    }
                }
                if let Err(e) = epoll_ctl(
                    &self.epoll,
                    libc::EPOLL_CTL_ADD,
                    fd.as_fd(),
                    SOCKET_EVENTS,
                    Token::new(Kind::RecvBackend, index, gen),
                ) {
                    return self
                        .driver
                        .immediate
                        .push_back(Immediate::Connected(Err(Errno(errno(&e)))));
                }
                slot.fds[1] = Some(fd);
                slot.readable[1] = false;
                slot.writable[1] = false;
                slot.hup[1] = false;
                slot.connecting = true;
            }
            Op::CancelConnect => {
                if std::mem::take(&mut slot.connecting) {
                    // Closing the socket abandons the connect (and leaves the set).
                    slot.fds[1] = None;
                    self.driver
                        .immediate
                        .push_back(Immediate::Connected(Err(Errno::CANCELED)));
                }
            }
            Op::Recv { from, via } => {
                if let Some(b) = slot.buffer[from as usize].take() {
                    self.bufs.give(b);
                }
                let Some(slot) = self.conns.get_mut(index, gen) else {
                    return;
                };
                if via == Via::Pipe && slot.pipe[from as usize].is_none() {
                    match self.pipes.take() {
                        Ok(p) => slot.pipe[from as usize] = Some(p),
                        Err(e) => {
                            return self
                                .driver
                                .immediate
                                .push_back(Immediate::Received(from, Err(Errno(errno(&e))), 0))
                        }
                    }
                }
                if slot.readable[from as usize] {
                    self.try_recv(index, gen, from, via);
                } else {
                    slot.want_recv[from as usize] = Some(via);
                }
            }
            Op::Send { to, data, offset, len } => {
                if slot.writable[to as usize] {
                    self.try_send(index, gen, to, data, offset, len);
                } else {
                    slot.want_send[to as usize] = Some((data, offset, len));
                }
            }
            Op::ShutdownWrite(side) => {
                if let Some(fd) = &slot.fds[side as usize] {
                    let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Write);
                }
            }
            Op::Abort => {
                // Nothing is in the kernel: the waits are the loop's own.
                if std::mem::take(&mut slot.connecting) {
                    self.driver
                        .immediate
                        .push_back(Immediate::Connected(Err(Errno::CANCELED)));
                }
                for side in [Side::Client, Side::Backend] {
                    if slot.want_recv[side as usize].take().is_some() {
                        self.driver
                            .immediate
                            .push_back(Immediate::Received(side, Err(Errno::CANCELED), 0));
                    }
                    if slot.want_send[side as usize].take().is_some() {
                        self.driver
                            .immediate
                            .push_back(Immediate::Sent(side, Err(Errno::CANCELED)));
                    }
                }
            }
            Op::Close {
                reset_client,
                reset_backend,
            } => {
                let Some(mut slot) = self.conns.remove(index) else {
                    return;
                };
                for (fd, reset) in [(&slot.fds[0], reset_client), (&slot.fds[1], reset_backend)] {
                    if let (Some(fd), true) = (fd, reset) {
                        reset_on_close(fd.as_fd());
                    }
                }
                for b in slot.buffer.iter_mut().filter_map(|b| b.take()) {
                    self.bufs.give(b);
                }
                for p in slot.pipe.iter_mut().filter_map(|p| p.take()) {
                    self.pipes.give(p);
                }
                // Dropping the slot closes both sockets (and leaves the set).
            }
        }
    }

    fn try_recv(&mut self, index: u32, gen: u32, from: Side, via: Via) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        let fd = slot.fd(from);
        let (res, cap) = match via {
            Via::Buffer => {
                let mut buf = self.bufs.take();
                let cap = buf.capacity();
                // SAFETY: reads at most `cap` bytes into the vector's own
                // allocation; the length is set to what the kernel wrote.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), cap, libc::MSG_DONTWAIT) };
                let res = if n < 0 {
                    self.bufs.give(buf);
                    Err(std::io::Error::last_os_error())
                } else {
                    // SAFETY: the kernel initialised the first `n` bytes.
                    unsafe { buf.set_len(n as usize) };
                    slot.buffer[from as usize] = Some(buf);
                    Ok(n as usize)
                };
                (res, cap)
            }
            Via::Preread => {
                let space = slot.conn.preread_space();
                let cap = space.len();
                // SAFETY: reads at most `cap` bytes into the machine's own buffer.
                let n = unsafe { libc::recv(fd, space.as_mut_ptr().cast(), cap, libc::MSG_DONTWAIT) };
                let res = if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                };
                (res, cap)
            }
            Via::Pipe => {
                let pipe = slot.pipe[from as usize].as_mut().expect("splice with a pipe");
                let socket = slot.fds[from as usize].as_ref().map(AsFd::as_fd);
                (pipe.fill_from(socket, SPLICE_CHUNK), SPLICE_CHUNK)
            }
        };
        match res {
            Ok(n) => {
                if n > 0 && n < cap && !slot.hup[from as usize] {
                    // A short read drained the socket: wait for the next
                    // edge. Not once the FIN is known: its edge has come
                    // already, and the next read returns the end of stream.
                    slot.readable[from as usize] = false;
                }
                let cap = if via == Via::Buffer { cap } else { 0 };
                self.driver.immediate.push_back(Immediate::Received(from, Ok(n), cap));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                slot.readable[from as usize] = false;
                slot.want_recv[from as usize] = Some(via);
            }
            Err(e) => self
                .driver
                .immediate
                .push_back(Immediate::Received(from, Err(Errno(errno(&e))), 0)),
        }
    }

    fn try_send(&mut self, index: u32, gen: u32, to: Side, data: Data, offset: usize, len: usize) {
        let Some(slot) = self.conns.get_mut(index, gen) else {
            return;
        };
        let fd = slot.fd(to);
        let res = match data {
            Data::Pipe => slot.pipe[to.other() as usize]
                .as_mut()
                .expect("splice with a pipe")
                .drain_to(slot.fds[to as usize].as_ref().map(AsFd::as_fd), len),
            Data::Header | Data::Buffer | Data::Preread => {
                let bytes: &[u8] = match data {
                    Data::Header => slot.conn.proxy_header(),
                    Data::Preread => slot.conn.preread_unsent(),
                    _ => slot.buffer[to.other() as usize].as_deref().unwrap_or(&[]),
                };
                let bytes = &bytes[offset.min(bytes.len())..(offset + len).min(bytes.len())];
                // SAFETY: sends from a live slice; MSG_NOSIGNAL turns a
                // broken pipe into EPIPE instead of a signal.
                let n = unsafe {
                    libc::send(
                        fd,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        };
        match res {
            Ok(n) => {
                if n < len {
                    // The send buffer is full: the rest waits for EPOLLOUT.
                    slot.writable[to as usize] = false;
                }
                self.driver.immediate.push_back(Immediate::Sent(to, Ok(n)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                slot.writable[to as usize] = false;
                slot.want_send[to as usize] = Some((data, offset, len));
            }
            Err(e) => self
                .driver
                .immediate
                .push_back(Immediate::Sent(to, Err(Errno(errno(&e))))),
        }
    }
}

/// Runs worker `id` on epoll; returns only if the loop can't be set up.
pub fn run(id: usize, shared: Arc<Shared>, inbox: WorkerInbox) -> std::io::Result<()> {
    let worker = EpollWorker::new(id, shared.clone(), inbox)?;
    log::info!("worker {id} started on epoll (edge-triggered)");
    shared.set_worker_setup(id, "edge-triggered".to_string());
    worker.run();
    Ok(())
}
