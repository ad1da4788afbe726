//! One proxied TCP connection as a state machine: events in, operations out.
//!
//! A [`Conn`] is created for an accepted client and decides everything
//! about it: admission, which backend to connect to and when to give up,
//! the PROXY header, what to receive and send on which side, half-closes,
//! the idle timeout, drains, and the counters. The shell (an io engine)
//! owns the sockets and buffers; it carries out each [`Op`] and reports the
//! result with the matching `on_*` method. The machine tracks every op it
//! asked for, so [`Op::Close`] comes exactly once, last, when no op of the
//! connection is in flight any more: a shell that obeys it never closes a
//! descriptor the kernel still uses, and never leaks one.
//!
//! Flow control is one chunk per direction: a side is read only once the
//! previous chunk read from it has been sent in full to the other side, so
//! a connection holds at most one buffer (or one pipe) per direction, and
//! an idle one holds none.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access_log::{self, Proto, Record};
use crate::admission::limits::ListenerLimits;
use crate::admission::SourceKey;
use crate::config::{AccessLog, ListenerConfig, ProxyProtocol, RelayMode, SourceMode};
use crate::errno::ConnectBlame;
use crate::proxy::proxy_protocol::{self, Header};
use crate::snapshot::{Backend, PoolSnapshot, Snapshot};
use crate::stats::{ListenerStats, RefuseReason};

use super::preread::{Preread, Route, Stage, Step};
use super::select::{select, Selection};

/// Full-buffer reads in a row after which `relay = "auto"` switches a
/// direction from copying to splicing (bulk data is flowing).
pub const AUTO_BULK_READS: u8 = 4;

/// One end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted client socket.
    Client = 0,
    /// The socket connected to the backend.
    Backend = 1,
}

impl Side {
    /// The other end.
    #[inline]
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    #[inline]
    fn index(self) -> usize {
        self as usize
    }
}

/// How a direction's bytes travel between its two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through a user-space buffer the shell holds for the direction.
    Buffer,
    /// Through a kernel pipe the shell holds for the direction (splice).
    Pipe,
    /// Into the connection's own pre-read buffer ([`Conn::preread_space`]),
    /// before a backend is chosen (client side only).
    Preread,
}

/// What a send takes its bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// The connection's PROXY protocol header ([`Conn::proxy_header`]).
    Header,
    /// The chunk the direction toward this side last received, in the
    /// shell's buffer for that direction.
    Buffer,
    /// The bytes in the direction's pipe.
    Pipe,
    /// The client's pre-read bytes not sent yet ([`Conn::preread_unsent`]).
    Preread,
}

/// A system error number (the shells see errno values: io_uring returns
/// them negated, syscalls through `errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The operation was cancelled (a linked timeout or an explicit cancel).
    pub const CANCELED: Errno = Errno(libc::ECANCELED);
    /// A timer ran out (io_uring's linked timeout on its own completion).
    pub const TIMED_OUT: Errno = Errno(libc::ETIMEDOUT);

    fn is_reset(self) -> bool {
        matches!(self.0, libc::ECONNRESET | libc::EPIPE)
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// An operation the shell must carry out for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Open a socket to `addr` and connect it; report with
    /// [`Conn::on_connected`]. The shell may enforce `deadline` itself (a
    /// linked timeout); the machine also asks for [`Op::CancelConnect`]
    /// when its timer finds the deadline passed.
    Connect {
        /// Backend address.
        addr: SocketAddr,
        /// When the attempt counts as timed out.
        deadline: Instant,
        /// `source = "client"`: bind the socket to this client's address
        /// (`IP_TRANSPARENT`) before connecting.
        transparent_for: Option<SocketAddr>,
    },
    /// Abandon the connect in flight; its completion (an error) follows.
    CancelConnect,
    /// Receive from `from`, into the direction's buffer or pipe; report with
    /// [`Conn::on_received`] (0 bytes = end of stream). Any buffer the shell
    /// still holds for this direction is free to reuse.
    Recv {
        /// The side read from.
        from: Side,
        /// Into a buffer or a pipe.
        via: Via,
    },
    /// Send `len` bytes from `data` at `offset` to `to`; report with
    /// [`Conn::on_sent`] (a short send is fine: the rest is asked for next).
    Send {
        /// The side written to.
        to: Side,
        /// Where the bytes are.
        data: Data,
        /// Offset into the data.
        offset: usize,
        /// Bytes to send.
        len: usize,
    },
    /// Pass a half-close on: `shutdown(SHUT_WR)` on `side`. No report.
    ShutdownWrite(Side),
    /// Stop every op in flight on the connection's sockets (shut them down
    /// or cancel the ops); their completions follow as usual.
    Abort,
    /// The connection is over and nothing is in flight: close its sockets
    /// (with a reset, `SO_LINGER` 0, where asked) and free its buffers and
    /// pipes. Always the last op, exactly once.
    Close {
        /// Reset the client instead of a clean close.
        reset_client: bool,
        /// Reset the backend instead of a clean close.
        reset_backend: bool,
    },
}

/// How a relayed connection ended (for the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished (or an error on a socket tore it down).
    Done,
    /// No byte moved for the idle timeout.
    IdleTimeout,
    /// Closed by ringlb (drain timeout, removed listener, shutdown).
    Closed,
}

/// Everything a connection needs from the worker at accept time.
pub struct ConnParams<'a> {
    /// The listener's settings.
    pub config: &'a Arc<ListenerConfig>,
    /// The listener's counters.
    pub stats: &'a Arc<ListenerStats>,
    /// The listener's admission state.
    pub limits: &'a Arc<ListenerLimits>,
    /// The listener's pool in the current snapshot.
    pub pool: &'a Arc<PoolSnapshot>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to (only read with PROXY protocol
    /// on; `None` when it could not be found).
    pub local: Option<SocketAddr>,
    /// Log one line (text) or record (JSON) when the connection ends.
    pub access_log: AccessLog,
    /// The whole snapshot, for a listener that routes by SNI (its routes'
    /// pools are looked up in it); `None` otherwise.
    pub snapshot: Option<Arc<Snapshot>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the client's first bytes (PROXY header, ClientHello) into
    /// the pre-read buffer; no backend chosen yet.
    Preread,
    /// A connect to `selection.candidates()[candidate]` is in flight.
    Connecting,
    /// Both sockets are open and bytes move.
    Relaying,
    /// Aborted or refused: waiting for the ops in flight, then Close.
    Closing,
    /// Close was returned.
    Done,
}

/// One direction: bytes read from its source side, sent to the other.
#[derive(Debug, Clone, Copy)]
struct Direction {
    via: Via,
    /// A receive from the source is in flight.
    recv_in_flight: bool,
    /// A send to the destination is in flight.
    send_in_flight: bool,
    /// Bytes of the current chunk, and how many of them were sent.
    chunk: usize,
    sent: usize,
    /// The source sent its FIN and it was passed on (or will be once the
    /// chunk is out).
    eof: bool,
    /// Full reads in a row (the `auto` switch).
    full_reads: u8,
    /// Bytes moved.
    bytes: u64,
}

impl Direction {
    fn new(via: Via) -> Direction {
        Direction {
            via,
            recv_in_flight: false,
            send_in_flight: false,
            chunk: 0,
            sent: 0,
            eof: false,
            full_reads: 0,
            bytes: 0,
        }
    }
}

/// One proxied connection. See the module docs.
pub struct Conn {
    phase: Phase,
    config: Arc<ListenerConfig>,
    stats: Arc<ListenerStats>,
    limits: Arc<ListenerLimits>,
    source: SourceKey,
    /// Admission counts taken (released at the end).
    admitted: bool,
    peer: SocketAddr,
    /// The address the client connected to (the PROXY header's destination
    /// when one was accepted).
    local: Option<SocketAddr>,
    access_log: AccessLog,
    /// Pre-read state (only on listeners with `accept_proxy` or SNI routes).
    pre: Option<Box<Preread>>,
    /// The snapshot SNI routes are looked up in (only during the pre-read).
    snapshot: Option<Arc<Snapshot>>,
    /// The `[[listener.route]]` entry taken.
    route: Option<u16>,
    /// The server name read, kept for the JSON access log.
    sni: Option<Box<str>>,
    /// Time of the successful connect.
    connect_time: Option<Duration>,
    /// Why it was refused, if it was (for the access log).
    refused: Option<RefuseReason>,
    /// The `now` of the last event (the machine reads no clock).
    seen: Instant,
    /// The pool while connecting (dropped once connected).
    pool: Option<Arc<PoolSnapshot>>,
    selection: Option<Selection>,
    /// Next candidate to try.
    next_candidate: usize,
    attempts: u32,
    full: u32,
    connect_in_flight: bool,
    connect_cancelled: bool,
    connect_started: Instant,
    connect_deadline: Instant,
    backend: Option<Arc<Backend>>,
    /// A backend connection slot is held (max_connections set).
    slot_counted: bool,
    /// Whether the connect in flight is counted in the backend's
    /// `connecting` gauge (pools whose balance reads loads).
    connecting_counted: bool,
    header: Option<Header>,
    header_sent: usize,
    /// Indexed by source side: [client → backend, backend → client].
    dirs: [Direction; 2],
    relay: RelayMode,
    last_activity: Instant,
    started: Instant,
    end: End,
    reset_client: bool,
    reset_backend: bool,
    /// The connection was counted as opened (relaying started).
    opened: bool,
}

impl Conn {
    /// A new accepted client: counts it, admits or refuses it, and starts
    /// the first connect. The ops to carry out are pushed to `out`.
    pub fn accept(p: ConnParams<'_>, now: Instant, out: &mut Vec<Op>) -> Conn {
        let relay = p.config.relay;
        let via = if relay == RelayMode::Splice {
            Via::Pipe
        } else {
            Via::Buffer
        };
        let mut conn = Conn {
            phase: Phase::Connecting,
            config: p.config.clone(),
            stats: p.stats.clone(),
            limits: p.limits.clone(),
            source: p.limits.source_key(p.peer.ip()),
            admitted: false,
            peer: p.peer,
            local: p.local,
            access_log: p.access_log,
            pre: None,
            snapshot: None,
            route: None,
            sni: None,
            connect_time: None,
            refused: None,
            seen: now,
            pool: None,
            selection: None,
            next_candidate: 0,
            attempts: 0,
            full: 0,
            connect_in_flight: false,
            connect_cancelled: false,
            connect_started: now,
            connect_deadline: now,
            backend: None,
            slot_counted: false,
            connecting_counted: false,
            header: None,
            header_sent: 0,
            dirs: [Direction::new(via); 2],
            relay,
            last_activity: now,
            started: now,
            end: End::Done,
            reset_client: false,
            reset_backend: false,
            opened: false,
        };
        conn.stats.accepted.inc();
        if p.config.accept_proxy.is_some() || p.config.sni.is_some() {
            if let Some(ap) = &p.config.accept_proxy {
                if !ap.trusts(p.peer.ip()) {
                    conn.reset_client = true;
                    conn.refuse(RefuseReason::ProxyUntrusted, out);
                    return conn;
                }
            }
            // Admission, the pool and the backend wait for the first
            // bytes: the PROXY header names the real client, the
            // ClientHello the pool.
            conn.phase = Phase::Preread;
            conn.pre = Some(Box::new(Preread::new(p.config, now)));
            conn.snapshot = p.snapshot;
            conn.pool = Some(p.pool.clone());
            conn.recv(Side::Client, out);
            return conn;
        }
        conn.start(p.pool, now, out);
        conn
    }

    /// Admits the client, selects its candidates in `pool` and starts the
    /// first connect.
    fn start(&mut self, pool: &Arc<PoolSnapshot>, now: Instant, out: &mut Vec<Op>) {
        self.phase = Phase::Connecting;
        if let Err(reason) = self.limits.admit_connection(self.source, now) {
            // A reset tells the client at once and leaves no socket of ours
            // in FIN_WAIT for a flood of refused connections.
            self.reset_client = true;
            return self.refuse(reason, out);
        }
        self.admitted = true;
        let Some(selection) = select(pool, self.peer, self.config.hash_key, super::select::MAX_CANDIDATES) else {
            return self.refuse(RefuseReason::NoBackend, out);
        };
        if self.config.proxy_protocol != ProxyProtocol::Off {
            match self.local {
                Some(local) => self.header = proxy_protocol::header(self.config.proxy_protocol, self.peer, local),
                None => return self.refuse(RefuseReason::ConnectFailed, out),
            }
        }
        self.selection = Some(selection);
        self.pool = Some(pool.clone());
        self.connect_next(now, out);
    }

    /// Where the shell reads pre-read bytes ([`Via::Preread`]).
    pub fn preread_space(&mut self) -> &mut [u8] {
        match self.pre.as_mut() {
            Some(p) => p.space(),
            None => &mut [],
        }
    }

    /// The pre-read bytes still to send to the backend ([`Data::Preread`]).
    pub fn preread_unsent(&self) -> &[u8] {
        self.pre.as_ref().map_or(&[], |p| p.unsent())
    }

    /// A pre-read receive finished (or was aborted at the deadline).
    fn on_preread(&mut self, result: Result<usize, Errno>, now: Instant, out: &mut Vec<Op>) {
        let pre = self.pre.as_mut().expect("pre-read phase has its state");
        match result {
            Ok(0) => pre.eof = true,
            Ok(n) => pre.len += n,
            Err(e) if e == Errno::CANCELED && pre.timed_out => {}
            // Reset or error before a backend was chosen.
            Err(_) => return self.refuse(RefuseReason::ClientClosed, out),
        }
        let was_proxy = pre.stage == Stage::Proxy;
        let step = pre.advance(&self.config, now);
        if was_proxy && pre.stage != Stage::Proxy {
            if let Some((src, dst)) = pre.addrs {
                // The balancer in front says who the client is.
                self.peer = src;
                self.local = Some(dst);
                self.source = self.limits.source_key(src.ip());
            }
        }
        match step {
            Step::More => {
                if pre.timed_out {
                    // The stage that timed out is over; the next one has
                    // its own deadline and a fresh receive.
                    pre.timed_out = false;
                }
                self.recv(Side::Client, out)
            }
            Step::Refuse(reason) => self.refuse(reason, out),
            Step::Connect(route) => {
                let snapshot = self.snapshot.take();
                let mut pool = self.pool.take().expect("pre-read keeps the default pool");
                if self.access_log == AccessLog::Json {
                    self.sni = pre
                        .sni()
                        .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase().into_boxed_str());
                }
                if let Route::Entry(i) = route {
                    self.route = Some(i);
                    let name = self
                        .config
                        .sni
                        .as_ref()
                        .and_then(|s| s.routes.get(i as usize))
                        .map(|r| r.pool.as_str());
                    match (snapshot.as_ref(), name) {
                        (Some(snap), Some(name)) => match snap.pools.iter().find(|p| p.name == name) {
                            Some(p) => pool = p.clone(),
                            None => return self.refuse(RefuseReason::NoBackend, out),
                        },
                        _ => return self.refuse(RefuseReason::NoBackend, out),
                    }
                }
                self.start(&pool, now, out)
            }
        }
    }

    /// The PROXY protocol header ([`Data::Header`]); empty when off.
    pub fn proxy_header(&self) -> &[u8] {
        self.header.as_ref().map_or(&[], |h| h.bytes())
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether [`Op::Close`] was returned: the shell may forget the connection.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the connection is relaying bytes (connected, not closing).
    pub fn is_relaying(&self) -> bool {
        self.phase == Phase::Relaying
    }

    /// When [`Conn::on_timer`] must be called next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Preread => self.pre.as_ref().filter(|p| !p.timed_out).map(|p| p.deadline),
            Phase::Connecting if self.connect_in_flight && !self.connect_cancelled => Some(self.connect_deadline),
            Phase::Relaying => Some(self.last_activity + self.config.idle_timeout),
            _ => None,
        }
    }

    /// The idle timeout (shells size their timer wheels by it).
    pub fn idle_timeout(&self) -> Duration {
        self.config.idle_timeout
    }

    /// Walks the preference order from the next candidate: backends at
    /// their connection limit are skipped (spill-over) without using up an
    /// attempt; at most `connect_attempts` are tried.
    fn connect_next(&mut self, now: Instant, out: &mut Vec<Op>) {
        let (Some(sel), Some(pool)) = (self.selection.as_ref(), self.pool.as_ref()) else {
            return self.refuse(RefuseReason::ConnectFailed, out);
        };
        if self.attempts < self.config.connect_attempts {
            while let Some(&index) = sel.candidates().get(self.next_candidate) {
                self.next_candidate += 1;
                let Some(backend) = pool.backends.get(index as usize) else {
                    continue;
                };
                let Some(counted) = backend.try_take_slot() else {
                    self.full += 1;
                    continue;
                };
                self.attempts += 1;
                self.slot_counted = counted;
                if pool.counts_load() {
                    backend.connecting.opened.inc();
                    self.connecting_counted = true;
                }
                self.backend = Some(backend.clone());
                self.connect_in_flight = true;
                self.connect_cancelled = false;
                self.connect_started = now;
                self.connect_deadline = now + self.config.connect_timeout;
                out.push(Op::Connect {
                    addr: backend.addr,
                    deadline: self.connect_deadline,
                    transparent_for: (self.config.source == SourceMode::Client).then_some(self.peer),
                });
                return;
            }
        }
        let reason = if self.attempts == 0 && self.full > 0 {
            RefuseReason::BackendFull
        } else {
            RefuseReason::ConnectFailed
        };
        self.refuse(reason, out);
    }

    /// The connect in flight finished.
    pub fn on_connected(&mut self, result: Result<(), Errno>, now: Instant, out: &mut Vec<Op>) {
        self.seen = now;
        if !self.connect_in_flight {
            debug_assert!(false, "on_connected with no connect in flight");
            return;
        }
        self.connect_in_flight = false;
        self.end_connecting();
        if self.phase != Phase::Connecting {
            // Aborted while connecting (shutdown): the socket goes with Close.
            return self.maybe_close(out);
        }
        let backend = self.backend.clone().expect("a connect has a backend");
        match result {
            Ok(()) => {
                self.stats
                    .connect_latency
                    .observe(now.saturating_duration_since(self.connect_started));
                backend.connect_succeeded();
                self.connect_time = Some(now.saturating_duration_since(self.connect_started));
                self.pool = None;
                self.selection = None;
                self.phase = Phase::Relaying;
                self.opened = true;
                self.stats.active.opened.inc();
                backend.stats.conns.opened.inc();
                self.last_activity = now;
                if self.header.is_some() {
                    self.send_header(out);
                } else {
                    self.after_header(out);
                }
                self.recv(Side::Backend, out);
            }
            Err(e) => {
                self.release_slot();
                self.backend = None;
                // One rule with the health checks and accept loops: a
                // shortage here is not the backend's fault.
                match crate::errno::connect_blame(e.0) {
                    ConnectBlame::OutOfResources => return self.refuse(RefuseReason::Overloaded, out),
                    ConnectBlame::NoLocalAddress => {
                        log::debug!("{} -> {}: connect failed here: {e}", self.peer, backend.addr);
                        return self.connect_next(now, out);
                    }
                    ConnectBlame::Backend => {}
                }
                let in_a_row = backend.connect_failed();
                let timed_out = self.connect_cancelled || e == Errno::CANCELED;
                // The reason is only formatted when debug logging is on.
                log::debug!(
                    "{} -> {}: connect failed ({in_a_row} in a row): {}",
                    self.peer,
                    backend.addr,
                    if timed_out {
                        "timed out".to_string()
                    } else {
                        e.to_string()
                    }
                );
                self.connect_next(now, out);
            }
        }
    }

    fn send_header(&mut self, out: &mut Vec<Op>) {
        let len = self.proxy_header().len();
        self.dirs[Side::Client.index()].send_in_flight = true;
        out.push(Op::Send {
            to: Side::Backend,
            data: Data::Header,
            offset: self.header_sent,
            len: len - self.header_sent,
        });
    }

    /// The outgoing PROXY header (if any) is out: the pre-read bytes go
    /// next, then the client is read as usual.
    fn after_header(&mut self, out: &mut Vec<Op>) {
        if let Some(pre) = &self.pre {
            let len = pre.unsent().len();
            if len > 0 {
                self.dirs[Side::Client.index()].send_in_flight = true;
                out.push(Op::Send {
                    to: Side::Backend,
                    data: Data::Preread,
                    offset: 0,
                    len,
                });
                return;
            }
            let eof = pre.eof;
            // Everything read is forwarded: the buffer goes.
            self.pre = None;
            if eof {
                // The client's FIN came during the pre-read.
                self.dirs[Side::Client.index()].eof = true;
                if self.dirs[Side::Backend.index()].eof {
                    return self.finish(End::Done, out);
                }
                out.push(Op::ShutdownWrite(Side::Backend));
                return;
            }
        }
        self.recv(Side::Client, out);
    }

    fn recv(&mut self, from: Side, out: &mut Vec<Op>) {
        let d = &mut self.dirs[from.index()];
        d.recv_in_flight = true;
        d.chunk = 0;
        d.sent = 0;
        let via = if self.phase == Phase::Preread {
            Via::Preread
        } else {
            d.via
        };
        out.push(Op::Recv { from, via });
    }

    /// A receive from `from` finished: `Ok(0)` is the end of its stream.
    /// `capacity` is the size of the buffer the shell read into (it drives
    /// the `auto` switch to splice; pass 0 for pipes).
    pub fn on_received(
        &mut self,
        from: Side,
        result: Result<usize, Errno>,
        capacity: usize,
        now: Instant,
        out: &mut Vec<Op>,
    ) {
        self.seen = now;
        let d = &mut self.dirs[from.index()];
        debug_assert!(d.recv_in_flight, "on_received with no receive in flight");
        d.recv_in_flight = false;
        if self.phase == Phase::Preread && from == Side::Client {
            return self.on_preread(result, now, out);
        }
        if self.phase != Phase::Relaying {
            return self.maybe_close(out);
        }
        match result {
            Ok(0) => {
                d.eof = true;
                if self.dirs[0].eof && self.dirs[1].eof {
                    // Both ends are done: the close sends the last FIN (both
                    // sockets were read to their end, so it is not a reset),
                    // and a shutdown(2) first would be a syscall for nothing.
                    return self.finish(End::Done, out);
                }
                // The half-close goes on at once: nothing is pending (a side
                // is read only when its previous chunk is out).
                out.push(Op::ShutdownWrite(from.other()));
            }
            Ok(n) => {
                self.last_activity = now;
                if self.relay == RelayMode::Auto && d.via == Via::Buffer {
                    d.full_reads = if capacity > 0 && n >= capacity {
                        d.full_reads.saturating_add(1)
                    } else {
                        0
                    };
                }
                d.chunk = n;
                d.sent = 0;
                d.send_in_flight = true;
                let data = if d.via == Via::Pipe { Data::Pipe } else { Data::Buffer };
                out.push(Op::Send {
                    to: from.other(),
                    data,
                    offset: 0,
                    len: n,
                });
            }
            Err(e) => self.socket_error(from, e, out),
        }
    }

    /// A send to `to` finished (possibly short).
    pub fn on_sent(&mut self, to: Side, result: Result<usize, Errno>, now: Instant, out: &mut Vec<Op>) {
        self.seen = now;
        let from = to.other();
        let d = &mut self.dirs[from.index()];
        debug_assert!(d.send_in_flight, "on_sent with no send in flight");
        d.send_in_flight = false;
        if self.phase != Phase::Relaying {
            return self.maybe_close(out);
        }
        let n = match result {
            Ok(n) => n,
            Err(e) => return self.socket_error(to, e, out),
        };
        if n == 0 {
            // A zero-byte send of a non-empty chunk: the socket is broken.
            return self.socket_error(to, Errno(libc::EPIPE), out);
        }
        if from == Side::Client && self.header.is_some() && self.header_sent < self.proxy_header().len() {
            self.header_sent += n;
            if self.header_sent < self.proxy_header().len() {
                return self.send_header(out);
            }
            return self.after_header(out);
        }
        if from == Side::Client && self.pre.is_some() {
            // Pre-read bytes: counted as client bytes when they are out.
            let pre = self.pre.as_mut().expect("checked");
            pre.sent += n;
            self.dirs[0].bytes += n as u64;
            self.stats.bytes_in.add(n as u64);
            if let Some(b) = &self.backend {
                b.stats.bytes_in.add(n as u64);
            }
            self.last_activity = now;
            return self.after_header(out);
        }
        let d = &mut self.dirs[from.index()];
        d.sent += n;
        if d.sent < d.chunk {
            d.send_in_flight = true;
            let data = if d.via == Via::Pipe { Data::Pipe } else { Data::Buffer };
            out.push(Op::Send {
                to,
                data,
                offset: if d.via == Via::Pipe { 0 } else { d.sent },
                len: d.chunk - d.sent,
            });
            return;
        }
        // The chunk is out: count it, then read the next one.
        let moved = d.chunk as u64;
        d.bytes += moved;
        self.last_activity = now;
        let backend = self.backend.as_ref().expect("relaying has a backend");
        if from == Side::Client {
            self.stats.bytes_in.add(moved);
            backend.stats.bytes_in.add(moved);
        } else {
            self.stats.bytes_out.add(moved);
            backend.stats.bytes_out.add(moved);
        }
        let d = &mut self.dirs[from.index()];
        if d.via == Via::Buffer && d.full_reads >= AUTO_BULK_READS {
            // Bulk data is flowing: stop copying it through user space.
            d.via = Via::Pipe;
        }
        self.recv(from, out);
    }

    /// A receive or send on `side` failed.
    fn socket_error(&mut self, side: Side, e: Errno, out: &mut Vec<Op>) {
        if e.is_reset() {
            // Pass an abort on as an abort: the peer of the other side sees
            // a reset too, not a clean end of stream.
            match side {
                Side::Client => self.reset_backend = true,
                Side::Backend => self.reset_client = true,
            }
        }
        self.abort(End::Done, out);
    }

    /// The timer asked for by [`Conn::deadline`] is due (or early: the
    /// machine checks the time itself).
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<Op>) {
        self.seen = now;
        match self.phase {
            Phase::Preread => {
                let Some(pre) = self.pre.as_mut() else { return };
                if !pre.timed_out && now >= pre.deadline {
                    // Stop the receive; its completion decides (a timeout
                    // refusal, or the SNI fallback).
                    pre.timed_out = true;
                    out.push(Op::Abort);
                }
            }
            Phase::Connecting if self.connect_in_flight && !self.connect_cancelled && now >= self.connect_deadline => {
                self.connect_cancelled = true;
                out.push(Op::CancelConnect);
            }
            Phase::Relaying if now >= self.last_activity + self.config.idle_timeout => {
                self.abort(End::IdleTimeout, out);
            }
            _ => {}
        }
    }

    /// Closes the connection if it must close now: its backend is draining
    /// past its deadline or removed, its listener was removed, or `force`
    /// (the shutdown timeout passed).
    pub fn check_close(&mut self, force: bool, out: &mut Vec<Op>) {
        if matches!(self.phase, Phase::Closing | Phase::Done) {
            return;
        }
        let backend_closing = self.backend.as_ref().is_some_and(|b| b.is_closing());
        let listener_closing = self.stats.closing.load(std::sync::atomic::Ordering::Relaxed);
        if force || backend_closing || listener_closing {
            self.abort(End::Closed, out);
        }
    }

    fn refuse(&mut self, reason: RefuseReason, out: &mut Vec<Op>) {
        self.stats.refuse(reason);
        self.refused = Some(reason);
        self.phase = Phase::Closing;
        self.maybe_close(out);
    }

    /// Ends a relaying connection whose directions are both done.
    fn finish(&mut self, end: End, out: &mut Vec<Op>) {
        self.end = end;
        self.phase = Phase::Closing;
        self.maybe_close(out);
    }

    /// Tears the connection down: ops in flight are stopped first.
    fn abort(&mut self, end: End, out: &mut Vec<Op>) {
        if matches!(self.phase, Phase::Closing | Phase::Done) {
            return;
        }
        if matches!(self.phase, Phase::Connecting | Phase::Preread) {
            // Accepted but never relayed: it still ends with one outcome.
            self.stats.refuse(RefuseReason::ConnectFailed);
            self.refused = Some(RefuseReason::ConnectFailed);
        }
        self.end = end;
        self.phase = Phase::Closing;
        if self.in_flight() {
            out.push(Op::Abort);
        }
        self.maybe_close(out);
    }

    fn in_flight(&self) -> bool {
        self.connect_in_flight || self.dirs.iter().any(|d| d.recv_in_flight || d.send_in_flight)
    }

    /// Returns Close once nothing is in flight.
    fn maybe_close(&mut self, out: &mut Vec<Op>) {
        if self.phase != Phase::Closing || self.in_flight() {
            return;
        }
        self.phase = Phase::Done;
        out.push(Op::Close {
            reset_client: self.reset_client,
            reset_backend: self.reset_backend,
        });
        self.release_counts();
        if self.access_log == AccessLog::Json {
            self.log_record(self.seen.saturating_duration_since(self.started));
        }
        if self.opened {
            self.opened = false;
            let backend = self.backend.as_ref().expect("opened has a backend");
            backend.stats.conns.closed.inc();
            self.stats.active.closed.inc();
            if self.access_log == AccessLog::Text {
                let how = match self.end {
                    End::Done => "done",
                    End::IdleTimeout => "idle timeout",
                    End::Closed => "closed by ringlb",
                };
                log::info!(
                    "{} -> {} via \"{}\": {} bytes up, {} bytes down, {:.3}s, {how}",
                    self.peer,
                    backend.addr,
                    self.config.name,
                    self.dirs[0].bytes,
                    self.dirs[1].bytes,
                    self.last_activity.saturating_duration_since(self.started).as_secs_f64()
                );
            }
        }
        self.pool = None;
    }

    /// Queues the connection's JSON access log record.
    fn log_record(&mut self, duration: Duration) {
        let end = match (self.refused, self.end) {
            (Some(_), _) => "refused",
            (None, End::Done) => "done",
            (None, End::IdleTimeout) => "idle_timeout",
            (None, End::Closed) => "closed",
        };
        access_log::push(Record {
            time: std::time::SystemTime::now(),
            proto: Proto::Tcp,
            listener: self.config.clone(),
            route: self.route,
            client: self.peer,
            backend: self.backend.as_ref().map(|b| b.addr),
            sni: self.sni.take(),
            bytes_up: self.dirs[0].bytes,
            bytes_down: self.dirs[1].bytes,
            datagrams: None,
            duration,
            connect: self.connect_time,
            attempts: self.attempts,
            end,
            reason: self.refused.map(|r| r.label()),
        });
    }

    /// Gives back what admission and the backend's limit counted.
    fn release_counts(&mut self) {
        self.release_slot();
        if self.admitted {
            self.admitted = false;
            self.limits.release(self.source);
        }
    }

    /// Takes the connect in flight out of the backend's `connecting` gauge.
    fn end_connecting(&mut self) {
        if self.connecting_counted {
            self.connecting_counted = false;
            if let Some(b) = &self.backend {
                b.connecting.closed.inc();
            }
        }
    }

    fn release_slot(&mut self) {
        self.end_connecting();
        if self.slot_counted {
            self.slot_counted = false;
            if let Some(b) = &self.backend {
                b.release_slot();
            }
        }
    }

    /// How it ended (meaningful once finished).
    pub fn end(&self) -> End {
        self.end
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A shell that drops a connection early (its worker is stopping)
        // still gives back what admission and the backend counted.
        self.release_counts();
        if self.opened {
            if let Some(b) = &self.backend {
                b.stats.conns.closed.inc();
            }
            self.stats.active.closed.inc();
        }
    }
}

#[cfg(test)]
mod tests;
