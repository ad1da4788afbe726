//! io engines: the only code that differs between io_uring and epoll.
//!
//! Everything else (config, tables, counters, timeouts, the relay logic) is
//! written once against the [`Engine`] and [`RelayStream`] traits.

pub mod epoll;
pub mod probe;
pub mod uring;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

pub use probe::{probe_io_uring, resolve_engine, IoEngine};

/// A connected TCP stream the relay reads and writes through owned buffers.
///
/// Methods take `&self` so that the two directions of a connection can run
/// at once on one task-local `Rc`.
// Futures here are polled on the worker thread that made them (thread-per-core),
// so they need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait RelayStream {
    /// Whether a pending read pins its buffer until data comes (completion
    /// engines). Readiness engines wait first and borrow a buffer only then.
    const PINS_BUFFER_WHILE_WAITING: bool;

    /// Waits until a read would find data or EOF (no-op on completion engines).
    async fn readable(&self) -> io::Result<()>;

    /// Reads into `buf`'s capacity (its length is reset first); on return
    /// `buf.len()` is the number of bytes read.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);

    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);

    /// The socket's file descriptor (for shutdown).
    fn fd(&self) -> RawFd;
}

/// Shuts a socket down. Errors are ignored: the socket may already be gone
/// from the peer's side, and the point is only that no op stays parked on it.
pub fn shutdown_fd(fd: RawFd, how: std::net::Shutdown) {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) on an fd we own only changes socket state.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// One io engine: how a worker runs, accepts and connects.
#[allow(async_fn_in_trait)]
pub trait Engine: 'static {
    /// Connected stream type.
    type Stream: RelayStream + 'static;
    /// Listening socket type.
    type Listener: 'static;

    /// Name shown in logs and `ctl status`.
    const NAME: &'static str;

    /// Whether this engine runs on io_uring, so the UDP path may batch its
    /// per-flow sends and receives on a private ring too.
    const IO_URING: bool;

    /// Runs `fut` to completion on a new runtime on this thread.
    fn block_on<F: Future + 'static>(fut: F) -> F::Output;

    /// Spawns a task on the current worker.
    fn spawn<F: Future<Output = ()> + 'static>(fut: F);

    /// Wraps a listening socket built by socket2.
    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener>;

    /// The listening socket's fd (shut down to stop accepting).
    fn listener_fd(listener: &Self::Listener) -> RawFd;

    /// Accepts one connection.
    async fn accept(listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)>;

    /// Converts a stream connected by tokio (whose connect can be cancelled on
    /// timeout) into this engine's stream.
    fn from_tokio(stream: tokio::net::TcpStream) -> io::Result<Self::Stream>;

    /// Converts an accepted stream into a tokio stream (for the splice relay,
    /// which works on readiness).
    fn into_tokio(stream: Self::Stream) -> io::Result<tokio::net::TcpStream>;
}
