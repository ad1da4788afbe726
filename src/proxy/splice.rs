//! Zero-copy relay: socket → pipe → socket with splice(2), readiness first.
//!
//! io_uring's SPLICE op always runs on an io-wq kernel thread, so a splice
//! that waits for data parks a kernel thread per connection. Here every
//! splice is a non-blocking syscall issued only after epoll said the socket
//! is ready (HAProxy's way), on tokio's reactor, which the io_uring engine's
//! runtime has underneath too. Each worker keeps a bounded pool of pipes, so a
//! connection does not create two pipes per transfer.
//!
//! `auto` starts each direction copying through pooled buffers and switches
//! it to splice once it moves bulk data (several full 64 KiB reads in a row),
//! like HAProxy's splice-auto: small request/response traffic never pays for
//! the pipe, bulk transfers stop copying through user space.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::buffers::{BufPool, LARGE_BUF};
use super::relay::{DirectionCounters, Pump};
use crate::engine::shutdown_fd;

/// Bytes moved per splice call (the default pipe size).
const SPLICE_CHUNK: usize = 64 * 1024;
/// Free pipes kept per worker (2 fds each); beyond that they are closed.
const MAX_FREE_PIPES: usize = 256;
/// Full reads in a row after which `auto` switches a direction to splice.
const AUTO_BULK_READS: u32 = 4;

/// A pipe: read end, write end.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
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
            }
        })
    }
}

/// A worker's pool of empty pipes.
#[derive(Default)]
pub struct PipePool {
    free: RefCell<Vec<Pipe>>,
}

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        match self.free.borrow_mut().pop() {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns a pipe; only an empty one can be reused.
    fn give(&self, pipe: Pipe, empty: bool) {
        let mut free = self.free.borrow_mut();
        if empty && free.len() < MAX_FREE_PIPES {
            free.push(pipe);
        }
    }
}

/// One non-blocking read into `buf`'s spare capacity (`buf` is empty).
fn read_into(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    debug_assert!(buf.is_empty());
    // SAFETY: reads at most `capacity` bytes into the vector's own allocation,
    // and the length is set to exactly what the kernel wrote.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.capacity(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised the first `n` bytes.
    unsafe { buf.set_len(n as usize) };
    Ok(n as usize)
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two fds we own; no user memory is touched.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
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

/// The splice (or auto) pump over tokio streams.
pub struct SplicePump<'a> {
    /// Buffers for the copying phase of `auto`.
    pub bufs: &'a BufPool,
    /// The worker's pipes.
    pub pipes: &'a PipePool,
    /// Start by copying and switch on bulk traffic.
    pub auto: bool,
}

enum Step {
    Eof,
    Moved(usize),
}

impl SplicePump<'_> {
    /// One copy step: wait for data, read it into a pooled buffer, write it.
    async fn copy_once(&self, src: &TcpStream, dst: &TcpStream) -> io::Result<Step> {
        src.readable().await?;
        let mut buf = self.bufs.take(true);
        let mut drained = 0;
        let res = src.try_io(Interest::READABLE, || {
            let n = read_into(src.as_raw_fd(), &mut buf)?;
            if n > 0 && n < buf.capacity() {
                // A short read emptied the socket's receive queue: report the
                // socket as drained, so the next wait sleeps until new data
                // instead of paying a read that only finds EAGAIN (one
                // syscall per message and direction). Data or a FIN that
                // arrives later raises a new edge; a FIN already seen by the
                // reactor stays set (tokio never clears closed states).
                drained = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match res {
            Ok(0) => {
                self.bufs.give(buf);
                return Ok(Step::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && drained > 0 => drained,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.bufs.give(buf);
                return Ok(Step::Moved(0));
            }
            Err(e) => {
                self.bufs.give(buf);
                return Err(e);
            }
        };
        let mut done = 0;
        while done < n {
            dst.writable().await?;
            match dst.try_write(&buf[done..n]) {
                Ok(w) => done += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.bufs.give(buf);
                    return Err(e);
                }
            }
        }
        self.bufs.give(buf);
        Ok(Step::Moved(n))
    }

    /// One splice step: socket → pipe, then pipe → socket until the pipe is empty.
    async fn splice_once(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        pipe: &Pipe,
        in_pipe: &mut usize,
    ) -> io::Result<Step> {
        src.readable().await?;
        let got = src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.write.as_raw_fd(), SPLICE_CHUNK)
        });
        let n = match got {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Moved(0)),
            Err(e) => return Err(e),
        };
        *in_pipe += n;
        while *in_pipe > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), *in_pipe)
            }) {
                Ok(w) => *in_pipe -= w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Step::Moved(n))
    }
}

impl Pump<TcpStream> for SplicePump<'_> {
    async fn pump(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        last: &Cell<Instant>,
        counters: DirectionCounters<'_>,
    ) -> u64 {
        let mut total = 0u64;
        let mut full_reads = 0u32;
        let mut pipe: Option<Pipe> = None;
        let mut in_pipe = 0usize;
        let ended_cleanly = loop {
            let step = if self.auto && pipe.is_none() && full_reads < AUTO_BULK_READS {
                self.copy_once(src, dst).await
            } else {
                if pipe.is_none() {
                    match self.pipes.take() {
                        Ok(p) => pipe = Some(p),
                        Err(_) => break false,
                    }
                }
                let p = pipe.as_ref().expect("taken above");
                self.splice_once(src, dst, p, &mut in_pipe).await
            };
            match step {
                Ok(Step::Eof) => break true,
                Ok(Step::Moved(0)) => {}
                Ok(Step::Moved(n)) => {
                    full_reads = if n >= LARGE_BUF { full_reads + 1 } else { 0 };
                    total += n as u64;
                    counters.listener.add(n as u64);
                    counters.backend.add(n as u64);
                    last.set(Instant::now());
                }
                Err(_) => break false,
            }
        };
        if let Some(p) = pipe {
            self.pipes.give(p, in_pipe == 0);
        }
        if ended_cleanly {
            shutdown_fd(dst.as_raw_fd(), Shutdown::Write);
        } else {
            shutdown_fd(src.as_raw_fd(), Shutdown::Both);
            shutdown_fd(dst.as_raw_fd(), Shutdown::Both);
        }
        total
    }
}
