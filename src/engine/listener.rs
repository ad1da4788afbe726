//! A TCP listener as a worker loop holds it, and what both loops do when
//! it accepts a client or fails to.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Conn, ConnParams, Op};
use crate::fd_reserve::FdReserve;
use crate::stats::RefuseReason;
use crate::worker::context::{Shared, StopSignal};

use super::sockets::{local_addr, peer_addr, shed_pending};

/// Pause after an accept error caused by resource exhaustion (EMFILE and
/// friends) so the loop doesn't spin while the pressure lasts.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// At most one accept-error warning per listener and worker in this period.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(5);

/// One listening socket of this worker.
pub struct TcpListener {
    /// Listener slot in the snapshot.
    pub slot: usize,
    /// Name, for logs.
    pub name: String,
    /// The SO_REUSEPORT socket (non-blocking).
    pub fd: OwnedFd,
    /// Fires when the listener is removed or ringlb shuts down.
    pub stop: Arc<StopSignal>,
    /// Accepting is paused (after EMFILE) until then.
    pub resume_at: Option<Instant>,
    /// The loop stopped accepting on it (cancelled, waiting to close).
    pub stopping: bool,
    last_warn: Option<Instant>,
}

impl TcpListener {
    /// A listener handed to this worker.
    pub fn new(slot: usize, name: String, fd: OwnedFd, stop: Arc<StopSignal>) -> TcpListener {
        TcpListener {
            slot,
            name,
            fd,
            stop,
            resume_at: None,
            stopping: false,
            last_warn: None,
        }
    }

    /// An accept failed with `errno`: counts and logs it (rate-limited),
    /// and on descriptor or memory exhaustion refuses the clients waiting
    /// in the backlog and pauses accepting for [`ACCEPT_BACKOFF`].
    pub fn accept_failed(&mut self, worker: usize, shared: &Shared, reserve: &FdReserve, errno: i32, now: Instant) {
        let snapshot = shared.snapshot.load();
        let stats = snapshot.listener(self.slot).map(|l| &l.stats);
        if let Some(s) = stats {
            s.accept_errors.inc();
        }
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
        {
            log::warn!(
                "worker {worker}: listener \"{}\": accept failed: {} (further errors for 5s not logged)",
                self.name,
                std::io::Error::from_raw_os_error(errno)
            );
            self.last_warn = Some(now);
        }
        if crate::errno::accept_is_shortage(errno) {
            let refused = shed_pending(reserve, self.fd.as_fd());
            if let Some(s) = stats {
                // Accepted (by the spare descriptor) and refused at once:
                // each still ends with exactly one outcome.
                s.accepted.add(refused);
                s.refused[RefuseReason::Overloaded as usize].add(refused);
            }
            self.resume_at = Some(now + ACCEPT_BACKOFF);
        }
    }
}

/// A client accepted on `listener`: builds its connection machine (which
/// admits or refuses it and asks for the first connect). `None` when the
/// listener is gone from the snapshot or the client's address can't be
/// read (the socket is then just closed).
pub fn accept_client(
    shared: &Shared,
    reserve: &FdReserve,
    listener: &TcpListener,
    client: &OwnedFd,
    now: Instant,
    out: &mut Vec<Op>,
) -> Option<Conn> {
    if reserve.is_short() {
        // Its last refill met EMFILE; descriptors are free again.
        reserve.refill();
    }
    let snapshot = shared.snapshot.load();
    let view = snapshot.listener(listener.slot)?;
    let peer: SocketAddr = peer_addr(client.as_fd()).ok()?;
    let local = match view.config.proxy_protocol {
        crate::config::ProxyProtocol::Off => None,
        _ => local_addr(client.as_fd(), view.config.bind),
    };
    let pool = snapshot.pools.get(view.pool)?;
    // SNI routes look their pools up in this snapshot once the ClientHello
    // is read (one reference count; nothing for other listeners).
    let routes = view
        .config
        .sni
        .as_ref()
        .map(|_| arc_swap::Guard::into_inner(shared.snapshot.load()));
    Some(Conn::accept(
        ConnParams {
            config: &view.config,
            stats: &view.stats,
            limits: &view.limits,
            pool,
            peer,
            local,
            access_log: shared.access_log(),
            snapshot: routes,
        },
        now,
        out,
    ))
}
