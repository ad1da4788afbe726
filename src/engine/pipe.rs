//! Pipes for the zero-copy relay (socket → pipe → socket with splice(2)),
//! pooled per worker so a connection never creates two per transfer.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Bytes moved per splice call (the default pipe size).
pub const SPLICE_CHUNK: usize = 64 * 1024;
/// Free pipes kept per worker (2 fds each); beyond that they are closed.
const MAX_FREE_PIPES: usize = 256;

/// A pipe and the bytes that sit in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Spliced in and not yet out.
    pub queued: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned here.
        Ok(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
                queued: 0,
            }
        })
    }

    /// One non-blocking splice from socket `from` into the pipe; `None`
    /// (the socket is gone) is EBADF.
    pub fn fill_from(&mut self, from: Option<BorrowedFd<'_>>, len: usize) -> io::Result<usize> {
        let from = from.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        let n = splice(from, self.write.as_fd(), len)?;
        self.queued += n;
        Ok(n)
    }

    /// One non-blocking splice from the pipe to socket `to`; `None` (the
    /// socket is gone) is EBADF.
    pub fn drain_to(&mut self, to: Option<BorrowedFd<'_>>, len: usize) -> io::Result<usize> {
        let to = to.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        let n = splice(self.read.as_fd(), to, len.min(self.queued))?;
        self.queued -= n;
        Ok(n)
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors borrowed for the call, so open
    // throughout it; no user memory is touched. Both ends are non-blocking
    // (O_NONBLOCK sockets and pipes, and SPLICE_F_NONBLOCK for the pipe side).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A worker's pool of empty pipes.
#[derive(Default)]
pub struct PipePool {
    free: RefCell<Vec<Pipe>>,
}

impl PipePool {
    /// An empty pipe from the pool, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        match self.free.borrow_mut().pop() {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns a pipe; one with bytes still in it is closed, not reused.
    pub fn give(&self, pipe: Pipe) {
        let mut free = self.free.borrow_mut();
        if pipe.queued == 0 && free.len() < MAX_FREE_PIPES {
            free.push(pipe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_go_through_and_only_empty_pipes_are_reused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut d, _) = l.accept().unwrap();
        let pool = PipePool::default();
        let mut p = pool.take().unwrap();
        assert_eq!(
            p.fill_from(Some(b.as_fd()), SPLICE_CHUNK).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        a.write_all(b"hello").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(p.fill_from(Some(b.as_fd()), SPLICE_CHUNK).unwrap(), 5);
        assert_eq!(p.queued, 5);
        assert_eq!(p.drain_to(Some(c.as_fd()), 5).unwrap(), 5);
        let mut got = [0; 5];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        pool.give(p);
        assert_eq!(pool.free.borrow().len(), 1);
        let mut p = pool.take().unwrap();
        p.queued = 3;
        pool.give(p);
        assert_eq!(pool.free.borrow().len(), 0, "a pipe with bytes in it is dropped");
    }
}
