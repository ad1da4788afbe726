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
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stats.active.closed.inc();
        self.backend.stats.conns.closed.inc();
        self.backend.stats.udp_flows.closed.inc();
    }
}

/// Whether a flow may keep sending to `backend` (not draining past its
/// timeout, removed, or down); otherwise its next datagram re-picks.
pub fn usable(backend: &Backend) -> bool {
    !backend.is_closing() && !backend.is_down()
}

/// A new non-blocking UDP socket connected to `backend` from an ephemeral port.
pub fn connect_udp(backend: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(crate::sockaddr::udp_local_for(backend))?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
