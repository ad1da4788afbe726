//! The io_uring engine (tokio-uring): completion-based reads and writes.
//!
//! tokio-uring cannot cancel an op: a dropped read keeps its socket open.
//! So nothing here is ever raced and dropped; callers stop ops by shutting
//! the socket down, which completes them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use super::{Engine, RelayStream};

/// Submission queue entries per worker ring.
const RING_ENTRIES: u32 = 1024;

/// The io_uring engine.
pub struct Uring;

impl RelayStream for tokio_uring::net::TcpStream {
    const PINS_BUFFER_WHILE_WAITING: bool = true;

    async fn readable(&self) -> io::Result<()> {
        Ok(())
    }

    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        tokio_uring::net::TcpStream::read(self, buf).await
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        tokio_uring::net::TcpStream::write_all(self, buf).await
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

impl Engine for Uring {
    type Stream = tokio_uring::net::TcpStream;
    type Listener = tokio_uring::net::TcpListener;
    const NAME: &'static str = "io_uring";
    const IO_URING: bool = true;

    fn block_on<F: Future + 'static>(fut: F) -> F::Output {
        tokio_uring::builder().entries(RING_ENTRIES).start(fut)
    }

    fn spawn<F: Future<Output = ()> + 'static>(fut: F) {
        tokio_uring::spawn(fut);
    }

    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener> {
        // io_uring on an O_NONBLOCK socket returns EAGAIN instead of waiting.
        socket.set_nonblocking(false)?;
        Ok(tokio_uring::net::TcpListener::from_std(socket))
    }

    fn listener_fd(listener: &Self::Listener) -> RawFd {
        listener.as_raw_fd()
    }

    async fn accept(listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        // Accepted sockets inherit TCP_NODELAY from the listening socket.
        listener.accept().await
    }

    fn into_tokio(stream: Self::Stream) -> io::Result<tokio::net::TcpStream> {
        // tokio-uring can't give its fd away; a dup keeps the socket open
        // after the io_uring stream (which has no op in flight) is dropped.
        // SAFETY: dup (close-on-exec, like every descriptor ringlb opens) of
        // an fd we own; the new fd is owned by the std stream.
        let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(stream);
        // SAFETY: fd is a fresh, owned socket descriptor.
        let std = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
    }

    fn from_tokio(stream: tokio::net::TcpStream) -> io::Result<Self::Stream> {
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(tokio_uring::net::TcpStream::from_std(std))
    }
}
