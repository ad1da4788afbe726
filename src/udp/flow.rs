//! One UDP client flow: its backend and its own connected socket toward it.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use crate::snapshot::Backend;
use crate::stats::ListenerStats;

/// One client flow. Dropping it closes its socket (which leaves the epoll
/// set by itself) and counts the flow as closed.
pub struct Flow {
    /// The backend chosen when the flow opened; it keeps it while usable.
    pub backend: Arc<Backend>,
    /// Connected to the backend, non-blocking.
    pub socket: UdpSocket,
    /// The listener's counters (the flow counts itself closed on drop).
    pub stats: Arc<ListenerStats>,
    /// `hash_key = "token"`: the hash of the token the flow was opened with
    /// (0 on other listeners). A datagram from the same address with another
    /// token is another session (an address handed on by a NAT): it re-picks.
    pub token: u64,
    /// What the JSON access log records of it (only when that log is on).
    pub log: Option<Box<FlowLog>>,
}

/// A flow's JSON access log record in the making.
pub struct FlowLog {
    /// Its listener.
    pub listener: Arc<crate::config::ListenerConfig>,
    /// The client.
    pub client: SocketAddr,
    /// When it opened.
    pub opened: std::time::Instant,
    /// Datagrams and payload bytes from the client.
    pub up: (u64, u64),
    /// Datagrams and payload bytes to the client.
    pub down: (u64, u64),
    /// How it ends: `idle_timeout` when expired, else `closed`.
    pub end: &'static str,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stats.active.closed.inc();
        self.backend.stats.conns.closed.inc();
        self.backend.stats.udp_flows.closed.inc();
        if let Some(l) = self.log.take() {
            crate::access_log::push(crate::access_log::Record {
                time: std::time::SystemTime::now(),
                proto: crate::access_log::Proto::Udp,
                listener: l.listener,
                route: None,
                client: l.client,
                backend: Some(self.backend.addr),
                sni: None,
                bytes_up: l.up.1,
                bytes_down: l.down.1,
                datagrams: Some((l.up.0, l.down.0)),
                duration: l.opened.elapsed(),
                connect: None,
                attempts: 1,
                end: l.end,
                reason: None,
            });
        }
    }
}

/// Whether a flow may keep sending to `backend` (not draining past its
/// timeout, removed, or down); otherwise its next datagram re-picks.
pub fn usable(backend: &Backend) -> bool {
    !backend.is_closing() && !backend.is_down()
}

/// A new non-blocking UDP socket connected to `backend`: from an ephemeral
/// port of ours, or with `transparent_for` from that client's own address
/// and port (`source = "client"`).
pub fn connect_udp(backend: SocketAddr, transparent_for: Option<SocketAddr>) -> std::io::Result<UdpSocket> {
    if let Some(client) = transparent_for {
        let source = crate::transparent::source_for(client, backend, client.port())?;
        let s = socket2::Socket::new(
            socket2::Domain::for_address(backend),
            socket2::Type::DGRAM.nonblocking().cloexec(),
            None,
        )?;
        crate::transparent::bind_transparent(std::os::fd::AsFd::as_fd(&s), source, false)?;
        s.connect(&backend.into())?;
        return Ok(s.into());
    }
    let socket = UdpSocket::bind(crate::sockaddr::udp_local_for(backend))?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
