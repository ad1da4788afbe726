//! The few socket calls both loops make directly, and EMFILE shedding.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::fd_reserve::{client_waiting, FdReserve};

/// A new non-blocking, close-on-exec TCP socket for `addr`'s family, with
/// `TCP_NODELAY` (a balancer must not delay small request/response
/// messages).
pub fn backend_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let fd = tcp_socket(addr)?;
    set_nodelay(&fd)?;
    Ok(fd)
}

/// With `transparent_for` (`source = "client"`), binds the fresh backend
/// socket `fd` to that client's IP (port chosen at connect) with
/// `IP_TRANSPARENT`; without it, hands `fd` back untouched.
pub fn transparent_source(
    fd: OwnedFd,
    backend: SocketAddr,
    transparent_for: Option<SocketAddr>,
) -> io::Result<OwnedFd> {
    if let Some(client) = transparent_for {
        let source = crate::transparent::source_for(client, backend, 0)?;
        crate::transparent::bind_transparent(std::os::fd::AsFd::as_fd(&fd), source, true)?;
    }
    Ok(fd)
}

/// `TCP_NODELAY` on `fd`.
pub fn set_nodelay(fd: &OwnedFd) -> io::Result<()> {
    socket2::SockRef::from(fd).set_nodelay(true)
}

/// A new non-blocking, close-on-exec TCP socket for `addr`'s family.
pub fn tcp_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SO_LINGER 0: the next close of `fd` sends a reset instead of a FIN.
pub fn reset_on_close(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

/// The peer address of an accepted socket.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket2::SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))
}

/// The address a client connected to: the listener's own unless it is
/// bound to a wildcard, else asked of the socket (one getsockname, only
/// with PROXY protocol on).
pub fn local_addr(fd: BorrowedFd<'_>, bind: SocketAddr) -> Option<SocketAddr> {
    if !bind.ip().is_unspecified() {
        return Some(bind);
    }
    socket2::SockRef::from(&fd).local_addr().ok()?.as_socket()
}

/// The errno of an io error (EIO when it has none).
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Out of descriptors: frees the worker's spare one and uses it to accept
/// and reset the clients waiting in the backlog (up to a batch), so they
/// are refused at once rather than left hanging; then takes the spare
/// back. Established connections are untouched. Returns how many were
/// refused.
pub fn shed_pending(reserve: &FdReserve, listener: BorrowedFd<'_>) -> u64 {
    const BATCH: u64 = 256;
    let mut refused = 0;
    reserve.refill();
    // EMFILE comes before the kernel looks for a waiting client: with none
    // waiting, a spare given up here would only go to someone else.
    let fd = listener.as_raw_fd();
    if client_waiting(listener) && reserve.release_one() {
        while refused < BATCH && client_waiting(listener) {
            // SAFETY: accept4 on our listening socket; the new fd is owned below.
            let client = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if client < 0 {
                break;
            }
            // SAFETY: accept4 just returned this fd; nobody else owns it.
            let client = unsafe { OwnedFd::from_raw_fd(client) };
            reset_on_close(std::os::fd::AsFd::as_fd(&client));
            drop(client);
            refused += 1;
        }
        reserve.refill();
    }
    refused
}
