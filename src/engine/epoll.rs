//! The epoll engine (tokio current-thread runtime): readiness first, then
//! non-blocking reads, so an idle connection holds no buffer at all.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use super::{Engine, RelayStream};

/// The epoll engine.
pub struct Epoll;

impl RelayStream for tokio::net::TcpStream {
    const PINS_BUFFER_WHILE_WAITING: bool = false;

    async fn readable(&self) -> io::Result<()> {
        tokio::net::TcpStream::readable(self).await
    }

    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        loop {
            match self.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                res => return (res, buf),
            }
            if let Err(e) = tokio::net::TcpStream::readable(self).await {
                return (Err(e), buf);
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut done = 0;
        while done < buf.len() {
            match self.try_write(&buf[done..]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.writable().await {
                        return (Err(e), buf);
                    }
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

impl Engine for Epoll {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;
    const NAME: &'static str = "epoll";
    const IO_URING: bool = false;

    fn block_on<F: Future + 'static>(fut: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a current-thread tokio runtime");
        tokio::task::LocalSet::new().block_on(&rt, fut)
    }

    fn spawn<F: Future<Output = ()> + 'static>(fut: F) {
        tokio::task::spawn_local(fut);
    }

    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener> {
        socket.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(socket)
    }

    fn listener_fd(listener: &Self::Listener) -> RawFd {
        listener.as_raw_fd()
    }

    async fn accept(listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        // Accepted sockets inherit TCP_NODELAY from the listening socket.
        listener.accept().await
    }

    fn from_tokio(stream: tokio::net::TcpStream) -> io::Result<Self::Stream> {
        Ok(stream)
    }

    fn into_tokio(stream: Self::Stream) -> io::Result<tokio::net::TcpStream> {
        Ok(stream)
    }
}
