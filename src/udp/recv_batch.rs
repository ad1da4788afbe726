//! Receives a burst of datagrams with one recvmmsg(2) call.
//!
//! A busy UDP listener gets datagrams in bursts; reading them one recvfrom
//! at a time costs a syscall per datagram plus one that finds the queue
//! empty. One recvmmsg reads up to [`BATCH`] at once into buffers that are
//! allocated once per listener and worker.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

use super::mmsg::{MmsgSlots, BATCH, BUF, HEADROOM};

/// Buffers and headers for one recvmmsg call. Each payload lands
/// [`HEADROOM`] bytes into its buffer, leaving room for a PROXY v2 header.
pub struct RecvBatch {
    slots: MmsgSlots,
    received: usize,
    /// Control-message room per slot, once [`RecvBatch::want_destinations`]
    /// asked for each datagram's destination address (u64s: cmsg alignment).
    ctrl: Option<Vec<[u64; CTRL_WORDS]>>,
}

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message (32 bytes on
/// 64-bit Linux), doubled.
const CTRL_WORDS: usize = 8;

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            slots: MmsgSlots::with_headroom(HEADROOM),
            received: 0,
            ctrl: None,
        }
    }
}

impl RecvBatch {
    /// From now on, reads each datagram's destination address too (the
    /// socket must have IP_PKTINFO / IPV6_RECVPKTINFO set): a wildcard
    /// listener's PROXY header names the address the client sent to.
    pub fn want_destinations(&mut self) {
        if self.ctrl.is_none() {
            self.ctrl = Some(vec![[0u64; CTRL_WORDS]; BATCH]);
        }
    }

    /// Reads up to [`BATCH`] datagrams without blocking; `WouldBlock` when
    /// none is queued. Returns how many were read.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        for i in 0..BATCH {
            self.slots.aim(i, BUF, namelen);
            if let Some(ctrl) = self.ctrl.as_mut() {
                let hdr = &mut self.slots.hdrs[i].msg_hdr;
                hdr.msg_control = ctrl[i].as_mut_ptr().cast();
                hdr.msg_controllen = std::mem::size_of::<[u64; CTRL_WORDS]>();
            }
        }
        // SAFETY: every header points at this struct's own buffers, address
        // storage and iovecs, which outlive the call and are not moved by it.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.slots.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.received = 0;
            return Err(io::Error::last_os_error());
        }
        self.received = n as usize;
        Ok(self.received)
    }

    /// Datagram `i` of the last call: its source and payload. `None` for an
    /// index past what was received or a source that is not IPv4/IPv6.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.received {
            return None;
        }
        let hdr = &self.slots.hdrs[i];
        // SAFETY: the kernel filled addrs[i] and set msg_namelen to its length.
        let addr = unsafe { socket2::SockAddr::new(self.slots.addrs[i], hdr.msg_hdr.msg_namelen) };
        let len = (hdr.msg_len as usize).min(BUF);
        Some((addr.as_socket()?, &self.slots.bufs[i][HEADROOM..HEADROOM + len]))
    }

    /// The destination address of datagram `i` of the last call, when
    /// [`RecvBatch::want_destinations`] is on and the kernel gave it.
    pub fn destination(&self, i: usize) -> Option<IpAddr> {
        if i >= self.received || self.ctrl.is_none() {
            return None;
        }
        let hdr = &self.slots.hdrs[i].msg_hdr;
        // SAFETY: `hdr` is the header recvmmsg filled in: msg_control points
        // at this slot's control buffer and msg_controllen says how much of it
        // the kernel wrote; the CMSG_* walk stays inside that length, and
        // the data read is copied out unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                let c = &*cmsg;
                let data = libc::CMSG_DATA(cmsg);
                if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                    // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
                    let a: [u8; 4] = std::ptr::read_unaligned(data.add(8).cast());
                    return Some(IpAddr::V4(Ipv4Addr::from(a)));
                }
                if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                    // struct in6_pktinfo { in6_addr ipi6_addr; unsigned ipi6_ifindex; }
                    let a: [u8; 16] = std::ptr::read_unaligned(data.cast());
                    return Some(IpAddr::V6(Ipv6Addr::from(a)));
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        None
    }

    /// Datagram `i` of the last call as its whole buffer, which the caller
    /// may rewrite (strip a token, write a header into the headroom), and
    /// the payload's range in it, which starts at [`HEADROOM`].
    pub fn get_mut(&mut self, i: usize) -> Option<(SocketAddr, &mut [u8], usize, usize)> {
        if i >= self.received {
            return None;
        }
        let hdr = &self.slots.hdrs[i];
        // SAFETY: the kernel filled addrs[i] and set msg_namelen to its length.
        let addr = unsafe { socket2::SockAddr::new(self.slots.addrs[i], hdr.msg_hdr.msg_namelen) };
        let len = (hdr.msg_len as usize).min(BUF);
        Some((addr.as_socket()?, &mut self.slots.bufs[i][..], HEADROOM, HEADROOM + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn reads_a_burst_with_sources_and_boundaries() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(b"one", to).unwrap();
        b.send_to(b"", to).unwrap();
        a.send_to(&vec![7u8; 65_507], to).unwrap();
        let mut batch = RecvBatch::default();
        let n = batch.recv(rx.as_fd()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(batch.get(0).unwrap(), (a.local_addr().unwrap(), &b"one"[..]));
        assert_eq!(batch.get(1).unwrap(), (b.local_addr().unwrap(), &b""[..]));
        let (src, big) = batch.get(2).unwrap();
        assert_eq!((src, big.len()), (a.local_addr().unwrap(), 65_507));
        assert!(batch.get(3).is_none());
        let err = batch.recv(rx.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(batch.get(0).is_none());
    }
}
