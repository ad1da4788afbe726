//! One epoll set holding a worker's flow sockets, so a single task reads the replies of every flow.
//!
//! A task per flow costs a task, a reactor registration and a wake-up per
//! reply; one level-triggered epoll set, itself watched by the runtime's
//! reactor, turns every wake-up into a batch: the ready flows come back from
//! one `epoll_wait`, their replies are read, and they leave together through
//! the listener socket. A flow's socket leaves the set by itself when the flow
//! closes it (the kernel drops closed descriptors from epoll sets).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Ready descriptors fetched per `epoll_wait`.
pub const EVENTS: usize = 64;

/// An epoll set of flow sockets.
pub struct FlowPoller {
    epfd: OwnedFd,
}

impl FlowPoller {
    /// An empty set.
    pub fn new() -> io::Result<FlowPoller> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(FlowPoller {
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for readable data and errors (level-triggered: a socket
    /// with datagrams left after one read is reported again).
    pub fn add(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let fd = fd.as_raw_fd();
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call,
        // and `fd` is borrowed, so open, for it.
        if unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills `ready` with the descriptors that have data or an error now,
    /// without waiting; `WouldBlock` when there are none.
    pub fn ready(&self, ready: &mut Vec<RawFd>) -> io::Result<()> {
        ready.clear();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // SAFETY: `events` has room for EVENTS entries.
        let n = unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), EVENTS as i32, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        ready.extend(events[..n as usize].iter().map(|e| e.u64 as RawFd));
        Ok(())
    }
}

impl AsRawFd for FlowPoller {
    fn as_raw_fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }
}

impl AsFd for FlowPoller {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn reports_sockets_with_data_until_it_is_read_and_forgets_closed_ones() {
        let poller = FlowPoller::new().unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        poller.add(a.as_fd()).unwrap();
        poller.add(b.as_fd()).unwrap();
        let mut ready = Vec::new();
        assert_eq!(poller.ready(&mut ready).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"1", a.local_addr().unwrap()).unwrap();
        sender.send_to(b"2", a.local_addr().unwrap()).unwrap();
        poller.ready(&mut ready).unwrap();
        assert_eq!(ready, vec![a.as_raw_fd()]);
        let mut buf = [0u8; 4];
        a.recv(&mut buf).unwrap();
        // Level-triggered: the second datagram keeps it ready.
        poller.ready(&mut ready).unwrap();
        assert_eq!(ready, vec![a.as_raw_fd()]);
        a.recv(&mut buf).unwrap();
        assert!(poller.ready(&mut ready).is_err());
        // A closed socket leaves the set.
        sender.send_to(b"3", b.local_addr().unwrap()).unwrap();
        drop(b);
        assert!(poller.ready(&mut ready).is_err());
    }

    #[test]
    fn an_icmp_error_makes_the_socket_ready() {
        let poller = FlowPoller::new().unwrap();
        // A port held by a socket connected elsewhere: nothing receives there,
        // so the kernel answers with ICMP port unreachable.
        let dead = UdpSocket::bind("127.0.0.1:0").unwrap();
        dead.connect("127.0.0.1:9").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let flow = UdpSocket::bind("127.0.0.1:0").unwrap();
        flow.connect(dead_addr).unwrap();
        flow.set_nonblocking(true).unwrap();
        poller.add(flow.as_fd()).unwrap();
        flow.send(b"x").unwrap();
        let mut ready = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while poller.ready(&mut ready).is_err() {
            assert!(std::time::Instant::now() < deadline, "no readiness for the ICMP error");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut buf = [0u8; 4];
        assert_eq!(
            flow.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }
}
