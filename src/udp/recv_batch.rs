//! Receives a burst of datagrams with one recvmmsg(2) call.
//!
//! A busy UDP listener gets datagrams in bursts; reading them one recvfrom
//! at a time costs a syscall per datagram plus one that finds the queue
//! empty. One recvmmsg reads up to [`BATCH`] at once into buffers that are
//! allocated once per listener and worker.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Datagrams read per call. 64 measured about 5% less CPU per packet than
/// 16 under a 512-in-flight load (bursts were filling 16 slots). The
/// buffers are 4 MiB of address space per listener and worker; only the
/// pages that datagrams actually reach become resident.
pub const BATCH: usize = 64;
/// Each buffer holds the largest UDP payload (65,507 bytes) whole.
const BUF: usize = 65_536;

/// Buffers and headers for one recvmmsg call.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    received: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; BUF]).collect(),
            addrs: zeroed_vec(),
            iovs: zeroed_vec(),
            hdrs: zeroed_vec(),
            received: 0,
        }
    }
}

/// `BATCH` all-zero C structs.
fn zeroed_vec<T>() -> Vec<T> {
    // SAFETY: only used for sockaddr_storage, iovec and mmsghdr: plain C
    // structs for which all-zero bytes are valid values.
    (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect()
}

impl RecvBatch {
    /// Reads up to [`BATCH`] datagrams without blocking; `WouldBlock` when
    /// none is queued. Returns how many were read.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: BUF,
            };
            let hdr = &mut self.hdrs[i];
            hdr.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        // SAFETY: every header points at this struct's own buffers, address
        // storage and iovecs, which outlive the call and are not moved by it.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
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
        let hdr = &self.hdrs[i];
        // SAFETY: the kernel filled addrs[i] and set msg_namelen to its length.
        let addr = unsafe { socket2::SockAddr::new(self.addrs[i], hdr.msg_hdr.msg_namelen) };
        let len = (hdr.msg_len as usize).min(BUF);
        Some((addr.as_socket()?, &self.bufs[i][..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
        let n = batch.recv(rx.as_raw_fd()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(batch.get(0).unwrap(), (a.local_addr().unwrap(), &b"one"[..]));
        assert_eq!(batch.get(1).unwrap(), (b.local_addr().unwrap(), &b""[..]));
        let (src, big) = batch.get(2).unwrap();
        assert_eq!((src, big.len()), (a.local_addr().unwrap(), 65_507));
        assert!(batch.get(3).is_none());
        let err = batch.recv(rx.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(batch.get(0).is_none());
    }
}
