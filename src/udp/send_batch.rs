//! Sends a burst of replies to different clients with one sendmmsg(2) call.
//!
//! Every reply of a UDP listener leaves through the listener's own socket, so
//! the replies read from many flows in one wake-up can go out together: one
//! syscall instead of one per datagram, and the clients are woken once the
//! whole burst is queued rather than between every two sends. Buffers are
//! allocated once per listener and worker.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::mmsg::MmsgSlots;
use super::mmsg::BATCH;

/// What one [`SendBatch::flush`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Bytes in those datagrams.
    pub bytes: usize,
    /// Datagrams dropped: the socket refused them (full buffer, unreachable
    /// client), which for UDP means the datagram is lost, not retried.
    pub dropped: usize,
}

/// Up to [`BATCH`] queued replies and the headers to send them.
pub struct SendBatch {
    slots: MmsgSlots,
    lens: [usize; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    queued: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            slots: MmsgSlots::default(),
            lens: [0; BATCH],
            addr_lens: [0; BATCH],
            queued: 0,
        }
    }
}

impl SendBatch {
    /// Replies queued and not yet sent.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Whether the batch must be flushed before the next [`SendBatch::push`].
    pub fn is_full(&self) -> bool {
        self.queued == BATCH
    }

    /// The buffer the next reply is read into; [`SendBatch::push`] queues it.
    /// Panics when the batch is full.
    pub fn next_buf(&mut self) -> &mut [u8] {
        &mut self.slots.bufs[self.queued]
    }

    /// Queues the first `len` bytes of [`SendBatch::next_buf`] for `to`.
    pub fn push(&mut self, len: usize, to: SocketAddr) {
        let i = self.queued;
        let addr = socket2::SockAddr::from(to);
        // SAFETY: a SockAddr's storage is a sockaddr_storage of `len()` valid bytes.
        self.slots.addrs[i] = unsafe { std::ptr::read(addr.as_ptr().cast::<libc::sockaddr_storage>()) };
        self.addr_lens[i] = addr.len();
        self.lens[i] = len.min(self.slots.bufs[i].len());
        self.queued += 1;
    }

    /// Sends everything queued through `fd` without blocking and empties the batch.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> Flushed {
        let mut done = Flushed::default();
        for i in 0..self.queued {
            self.slots.aim(i, self.lens[i], self.addr_lens[i]);
        }
        let mut at = 0;
        while at < self.queued {
            // SAFETY: headers at..queued point at this struct's own buffers,
            // addresses and iovecs, which outlive the call and are not moved by it.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.slots.hdrs[at..].as_mut_ptr(),
                    (self.queued - at) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                let n = n as usize;
                done.sent += n;
                done.bytes += self.lens[at..at + n].iter().sum::<usize>();
                at += n;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // A full send buffer refuses the rest of the burst alike.
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                    done.dropped += self.queued - at;
                    break;
                }
                // This one datagram failed (e.g. an unroutable client): skip it.
                _ => {
                    done.dropped += 1;
                    at += 1;
                }
            }
        }
        self.queued = 0;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn receiver() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    #[test]
    fn one_flush_delivers_each_reply_to_its_own_client_whole() {
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        let clients: Vec<UdpSocket> = (0..3).map(|_| receiver()).collect();
        let mut batch = SendBatch::default();
        for (i, c) in clients.iter().enumerate() {
            let payload = vec![i as u8 + 1; 1000 * (i + 1)];
            batch.next_buf()[..payload.len()].copy_from_slice(&payload);
            batch.push(payload.len(), c.local_addr().unwrap());
        }
        let big = receiver();
        batch.next_buf()[..65_507].fill(9);
        batch.push(65_507, big.local_addr().unwrap());
        assert_eq!(batch.len(), 4);
        let done = batch.flush(from.as_fd());
        assert_eq!(
            done,
            Flushed {
                sent: 4,
                bytes: 1000 + 2000 + 3000 + 65_507,
                dropped: 0
            }
        );
        assert!(batch.is_empty());
        let mut buf = vec![0u8; 70_000];
        for (i, c) in clients.iter().enumerate() {
            let (n, src) = c.recv_from(&mut buf).unwrap();
            assert_eq!(src, from.local_addr().unwrap());
            assert_eq!(n, 1000 * (i + 1));
            assert!(buf[..n].iter().all(|&b| b == i as u8 + 1));
        }
        assert_eq!(big.recv(&mut buf).unwrap(), 65_507);
    }

    #[test]
    fn a_failing_datagram_is_dropped_and_the_rest_are_sent() {
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ok = receiver();
        let mut batch = SendBatch::default();
        batch.next_buf()[..2].copy_from_slice(b"a1");
        batch.push(2, ok.local_addr().unwrap());
        // An IPv6 destination on an IPv4 socket fails with EAFNOSUPPORT/EINVAL.
        batch.push(2, "[::1]:9".parse().unwrap());
        batch.next_buf()[..2].copy_from_slice(b"a2");
        batch.push(2, ok.local_addr().unwrap());
        let done = batch.flush(from.as_fd());
        assert_eq!((done.sent, done.dropped), (2, 1));
        let mut buf = [0u8; 8];
        assert_eq!(ok.recv(&mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"a1");
        assert_eq!(ok.recv(&mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"a2");
    }

    #[test]
    fn full_batch_is_reported() {
        let mut batch = SendBatch::default();
        for _ in 0..BATCH {
            assert!(!batch.is_full());
            batch.push(1, "127.0.0.1:9".parse().unwrap());
        }
        assert!(batch.is_full());
    }
}
