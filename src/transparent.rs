//! Transparent source (`source = "client"`): backend sockets bound to the client's own address with `IP_TRANSPARENT`.
//!
//! Binding a socket to an address this host does not have needs
//! `IP_TRANSPARENT` (IPv6: `IPV6_TRANSPARENT`), which needs `CAP_NET_ADMIN`
//! (or `CAP_NET_RAW`). The backend then sees the client's address, and its
//! replies, addressed to the client, must be routed back through this host,
//! where a policy route delivers them locally (README "Transparent source").

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets `IP_TRANSPARENT` (or `IPV6_TRANSPARENT` for an IPv6 socket) on `fd`.
pub fn set_transparent(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor we borrow, with a pointer to a live
    // c_int and its exact size; the result is checked.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The address a socket toward `backend` binds to in order to appear as
/// `client`: the client's IP in the backend's family (an IPv4 client on a
/// dual-stack listener is unmapped), with `port`. An error when the
/// families cannot match (an IPv6 client to an IPv4 backend).
pub fn source_for(client: SocketAddr, backend: SocketAddr, port: u16) -> io::Result<SocketAddr> {
    let ip = match (client.ip(), backend.is_ipv4()) {
        (IpAddr::V4(v4), true) => IpAddr::V4(v4),
        (IpAddr::V6(v6), true) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        },
        (IpAddr::V4(v4), false) => IpAddr::V6(v4.to_ipv6_mapped()),
        (IpAddr::V6(v6), false) => IpAddr::V6(v6),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Makes `fd` (a fresh socket of `source`'s family) send from `source`:
/// `IP_TRANSPARENT`, then bind. For TCP with port 0 the port is chosen at
/// connect (`IP_BIND_ADDRESS_NO_PORT`), so many connections of one client
/// share no port range with each other's binds.
pub fn bind_transparent(fd: BorrowedFd<'_>, source: SocketAddr, tcp: bool) -> io::Result<()> {
    set_transparent(fd, source.is_ipv6())?;
    let sock = socket2::SockRef::from(&fd);
    if tcp && source.port() == 0 {
        let one: libc::c_int = 1;
        // SAFETY: as in set_transparent. Best effort: without it the bind
        // picks the port itself.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    if !tcp {
        // Another listener's flow from the same client address may hold the
        // same source; connected UDP sockets are told apart by their peers.
        sock.set_reuse_address(true)?;
    }
    sock.bind(&source.into())
}

/// Whether this process may use `IP_TRANSPARENT`: `Err` with the reason
/// ringlb refuses to start with `source = "client"`.
pub fn probe() -> Result<(), String> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(|e| format!("cannot make a socket to test IP_TRANSPARENT: {e}"))?;
    // SAFETY: `s` is open for the whole call.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    set_transparent(fd, false).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            format!("source = \"client\" needs CAP_NET_ADMIN (IP_TRANSPARENT: {e}); run as root or grant the capability (AmbientCapabilities=CAP_NET_ADMIN)")
        } else {
            format!("source = \"client\": IP_TRANSPARENT is not available here ({e})")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_source_takes_the_backends_family() {
        let b4 = sa("10.0.0.1:80");
        let b6 = sa("[2001:db8::1]:80");
        assert_eq!(source_for(sa("192.0.2.7:5000"), b4, 0).unwrap(), sa("192.0.2.7:0"));
        assert_eq!(
            source_for(sa("[::ffff:192.0.2.7]:5000"), b4, 5000).unwrap(),
            sa("192.0.2.7:5000")
        );
        assert_eq!(
            source_for(sa("192.0.2.7:5000"), b6, 1).unwrap(),
            sa("[::ffff:192.0.2.7]:1")
        );
        assert_eq!(source_for(sa("[2001:db8::7]:9"), b6, 9).unwrap(), sa("[2001:db8::7]:9"));
        assert!(source_for(sa("[2001:db8::7]:9"), b4, 9).is_err());
    }
}
