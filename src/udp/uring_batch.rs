//! A small private io_uring that sends a burst of datagrams on many sockets with one syscall.
//!
//! sendmmsg/recvmmsg batch datagrams of one socket; a UDP balancer's forwards
//! go out on a different socket per flow. Queued as io_uring operations, a
//! whole burst costs one `io_uring_enter` instead of a syscall per datagram. Every operation carries
//! `MSG_DONTWAIT`: it completes (or fails with `EAGAIN`) during that call and
//! never parks, so [`UringBatch::complete`] does not wait on the network.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// Operations that can be queued between two [`UringBatch::complete`] calls.
pub const CAPACITY: usize = 64;

/// One finished operation: the caller's tag and the syscall-style result
/// (bytes on success, `-errno` on failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The tag given when the operation was queued.
    pub tag: u32,
    /// Bytes moved, or the negated errno.
    pub result: i32,
}

/// A ring of [`CAPACITY`] entries used by one thread.
pub struct UringBatch {
    ring: IoUring,
    queued: usize,
}

impl UringBatch {
    /// A new ring; fails where io_uring is unavailable (the caller falls back
    /// to one syscall per datagram).
    pub fn new() -> io::Result<UringBatch> {
        // SUBMIT_ALL: a bad entry must not hold back the rest of the burst.
        // SINGLE_ISSUER + DEFER_TASKRUN (6.1): completions are run in our own
        // io_uring_enter, with no task-work interrupts in between.
        let ring = IoUring::builder()
            .setup_submit_all()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(CAPACITY as u32)
            .or_else(|_| IoUring::builder().setup_submit_all().build(CAPACITY as u32))
            .or_else(|_| IoUring::new(CAPACITY as u32))?;
        Ok(UringBatch { ring, queued: 0 })
    }

    /// Operations queued and not yet completed.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Whether [`UringBatch::complete`] must run before the next push.
    pub fn is_full(&self) -> bool {
        self.queued == CAPACITY
    }

    /// Queues a send of `len` bytes at `buf` on the connected socket `fd`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unchanged, and `fd` open, until the
    /// next [`UringBatch::complete`] returns. Panics when the batch is full.
    pub unsafe fn push_send(&mut self, fd: RawFd, buf: *const u8, len: usize, tag: u32) {
        let sqe = opcode::Send::new(types::Fd(fd), buf, len as u32)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .user_data(tag as u64);
        self.push(sqe);
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        assert!(self.queued < CAPACITY, "uring batch full");
        // SAFETY: the caller upholds the buffer and descriptor lifetimes; the
        // queue has room because at most CAPACITY entries are ever queued.
        unsafe { self.ring.submission().push(&sqe) }.expect("submission queue has room");
        self.queued += 1;
    }

    /// Submits everything queued, waits for all of it to finish (each
    /// operation finishes within the call: none may wait for the network),
    /// and appends the results to `out`.
    ///
    /// An error means the ring itself failed (not an operation: those come
    /// back as negative results). The caller must then drop this batch and
    /// fall back to plain syscalls; nothing queued stays lent to the kernel
    /// because no operation outlives the `io_uring_enter` that ran it.
    pub fn complete(&mut self, out: &mut Vec<Done>) -> io::Result<()> {
        let mut want = self.queued;
        let mut transient = 0;
        while want > 0 {
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                // Interrupted, or short of memory / completion room for a
                // moment: reap what finished and try again, a bounded number of times.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {
                    transient += 1;
                    if transient > 1000 {
                        self.queued = 0;
                        return Err(e);
                    }
                }
                Err(e) => {
                    self.queued = 0;
                    return Err(e);
                }
            }
            for cqe in self.ring.completion() {
                out.push(Done {
                    tag: cqe.user_data() as u32,
                    result: cqe.result(),
                });
                want -= 1;
            }
        }
        self.queued = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn connected_pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (a, b)
    }

    #[test]
    fn sends_on_many_sockets_in_one_call() {
        let Ok(mut batch) = UringBatch::new() else {
            eprintln!("io_uring unavailable here: skipped");
            return;
        };
        let pairs: Vec<_> = (0..5).map(|_| connected_pair()).collect();
        let payloads: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; 100 + i]).collect();
        for (i, ((a, _), p)) in pairs.iter().zip(&payloads).enumerate() {
            // SAFETY: payloads and sockets outlive complete() below.
            unsafe { batch.push_send(a.as_raw_fd(), p.as_ptr(), p.len(), i as u32) };
        }
        assert_eq!(batch.len(), 5);
        let mut out = Vec::new();
        batch.complete(&mut out).unwrap();
        assert!(batch.is_empty());
        out.sort_by_key(|d| d.tag);
        assert_eq!(
            out,
            (0..5)
                .map(|i| Done {
                    tag: i,
                    result: 100 + i as i32
                })
                .collect::<Vec<_>>()
        );
        let mut buf = [0u8; 256];
        for (i, (_, b)) in pairs.iter().enumerate() {
            assert_eq!(b.recv(&mut buf).unwrap(), 100 + i);
            assert!(buf[..100 + i].iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn a_failed_send_is_reported_for_its_socket_only() {
        let Ok(mut batch) = UringBatch::new() else {
            eprintln!("io_uring unavailable here: skipped");
            return;
        };
        let (a, b) = connected_pair();
        // A socket connected to a port where nothing receives: its first
        // send brings back ICMP port unreachable, which fails the next one.
        let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
        hole.connect("127.0.0.1:9").unwrap();
        let refused = UdpSocket::bind("127.0.0.1:0").unwrap();
        refused.connect(hole.local_addr().unwrap()).unwrap();
        refused.send(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let payload = b"hello";
        // SAFETY: payload and sockets outlive complete() below.
        unsafe {
            batch.push_send(refused.as_raw_fd(), payload.as_ptr(), payload.len(), 0);
            batch.push_send(a.as_raw_fd(), payload.as_ptr(), payload.len(), 1);
        }
        let mut out = Vec::new();
        batch.complete(&mut out).unwrap();
        out.sort_by_key(|d| d.tag);
        assert_eq!(out[0].result, -libc::ECONNREFUSED);
        assert_eq!(out[1].result, 5);
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), 5);
    }
}
