//! Listening sockets: one SO_REUSEPORT socket per worker, built with socket2.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Fails with `AddrInUse` when another process already listens on `addr`.
///
/// SO_REUSEPORT would let a second process (same user) share the port
/// silently. A probe socket with SO_REUSEADDR but without SO_REUSEPORT binds
/// over TIME_WAIT leftovers, but not over a live listener, which is exactly
/// the distinction wanted.
pub fn check_tcp_address_free(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

/// A listening TCP socket for one worker.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds `count` sockets for a listener, after checking that no other process
/// holds the address. The error names the address and says what to do.
pub fn bind_tcp_for_workers(
    name: &str,
    addr: SocketAddr,
    backlog: u32,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, String> {
    check_tcp_address_free(addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => format!("listener \"{name}\": {addr} is already in use by another process"),
        _ => format!("listener \"{name}\": cannot bind {addr}: {e}"),
    })?;
    (0..count)
        .map(|_| bind_tcp(addr, backlog).map_err(|e| format!("listener \"{name}\": cannot bind {addr}: {e}")))
        .collect()
}

/// Binds `count` SO_REUSEPORT UDP sockets for a listener, after checking that
/// no other process holds the address (a probe bound without SO_REUSEADDR or
/// SO_REUSEPORT fails if anyone has it).
pub fn bind_udp_for_workers(name: &str, addr: SocketAddr, count: usize) -> Result<Vec<std::net::UdpSocket>, String> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(|e| e.to_string())?;
    if addr.is_ipv6() {
        probe.set_only_v6(true).map_err(|e| e.to_string())?;
    }
    probe.bind(&addr.into()).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => format!("listener \"{name}\": udp {addr} is already in use by another process"),
        _ => format!("listener \"{name}\": cannot bind udp {addr}: {e}"),
    })?;
    drop(probe);
    (0..count)
        .map(|_| {
            let bind = || -> io::Result<std::net::UdpSocket> {
                let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
                socket.set_reuse_port(true)?;
                if addr.is_ipv6() {
                    socket.set_only_v6(true)?;
                }
                // Bursts of client datagrams queue here while a worker is busy.
                let _ = socket.set_recv_buffer_size(4 << 20);
                socket.bind(&addr.into())?;
                Ok(socket.into())
            };
            bind().map_err(|e| format!("listener \"{name}\": cannot bind udp {addr}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_an_address_another_socket_listens_on() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        let err = bind_tcp_for_workers("web", addr, 16, 2).unwrap_err();
        assert!(err.contains("already in use by another process"), "{err}");
        drop(other);
        assert_eq!(bind_tcp_for_workers("web", addr, 16, 2).unwrap().len(), 2);
    }
}
