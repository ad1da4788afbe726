//! The relay: both directions of a connection, half-close, idle timeout.
//! How bytes move in one direction is a [`Pump`]: copying through pooled
//! buffers (here) or splicing through a pipe (`super::splice`).

use std::cell::Cell;
use std::net::Shutdown;
use std::pin::pin;
use std::time::{Duration, Instant};

use crate::engine::{shutdown_fd, RelayStream};
use crate::stats::Counter;

use super::buffers::{BufPool, SMALL_BUF};

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished (EOF both ways, or an error tore it down).
    Finished,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// Closed on request (drain timeout, shutdown).
    Closed,
}

/// Byte counters one direction adds to.
pub struct DirectionCounters<'a> {
    /// The listener's counter for this direction.
    pub listener: &'a Counter,
    /// The backend's counter for this direction.
    pub backend: &'a Counter,
}

/// Moves one direction of a connection.
#[allow(async_fn_in_trait)]
pub trait Pump<S> {
    /// Moves `src` → `dst` until EOF (then passes the half-close on with
    /// `shutdown(Write)` toward `dst`) or an error (then shuts both down so
    /// the other direction ends too). Returns the bytes moved.
    async fn pump(&self, src: &S, dst: &S, last_activity: &Cell<Instant>, counters: DirectionCounters<'_>) -> u64;
}

/// The copy pump over a worker's buffer pool.
pub struct CopyPump<'a>(pub &'a BufPool);

impl<S: RelayStream> Pump<S> for CopyPump<'_> {
    async fn pump(&self, src: &S, dst: &S, last_activity: &Cell<Instant>, counters: DirectionCounters<'_>) -> u64 {
        pump(src, dst, self.0, last_activity, counters).await
    }
}

/// Copies `src` → `dst` until EOF or error. On EOF it passes the half-close
/// on (`shutdown(Write)` toward `dst`) and returns, leaving the other
/// direction running; on an error it tears both sockets down so the other
/// direction ends too.
async fn pump<S: RelayStream>(
    src: &S,
    dst: &S,
    pool: &BufPool,
    last_activity: &Cell<Instant>,
    counters: DirectionCounters<'_>,
) -> u64 {
    let mut total = 0u64;
    // Completion engines park a small buffer while idle and switch to a large
    // one once a read fills the small one (bulk data is flowing).
    let mut large = !S::PINS_BUFFER_WHILE_WAITING;
    loop {
        if src.readable().await.is_err() {
            break;
        }
        let buf = pool.take(large);
        let (res, buf) = src.read(buf).await;
        let n = match res {
            Ok(0) => {
                pool.give(buf);
                shutdown_fd(dst.fd(), Shutdown::Write);
                return total;
            }
            Ok(n) => n,
            Err(_) => {
                pool.give(buf);
                break;
            }
        };
        if S::PINS_BUFFER_WHILE_WAITING {
            large = n == buf.capacity() || (large && n >= SMALL_BUF);
        }
        let (res, buf) = dst.write_all(buf).await;
        pool.give(buf);
        if res.is_err() {
            break;
        }
        total += n as u64;
        counters.listener.add(n as u64);
        counters.backend.add(n as u64);
        last_activity.set(Instant::now());
    }
    shutdown_fd(src.fd(), Shutdown::Both);
    shutdown_fd(dst.fd(), Shutdown::Both);
    total
}

/// Relays between `client` and `backend` until both directions are done, the
/// connection idles for `idle_timeout`, or `close_requested` resolves.
///
/// On a timeout or close both sockets are shut down first and the pending
/// reads are then awaited: a completion engine's ops can't be cancelled, and
/// shutting the socket down is what completes them.
pub async fn relay<S: RelayStream, P: Pump<S>>(
    client: &S,
    backend: &S,
    pumper: &P,
    idle_timeout: Duration,
    up: DirectionCounters<'_>,
    down: DirectionCounters<'_>,
    close_requested: impl std::future::Future<Output = ()>,
) -> (RelayEnd, u64, u64) {
    let last_activity = Cell::new(Instant::now());
    let mut both = pin!(async {
        tokio::join!(
            pumper.pump(client, backend, &last_activity, up),
            pumper.pump(backend, client, &last_activity, down)
        )
    });
    let idle = async {
        loop {
            let deadline = last_activity.get() + idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    let end = tokio::select! {
        (a, b) = &mut both => return (RelayEnd::Finished, a, b),
        () = idle => RelayEnd::IdleTimeout,
        () = close_requested => RelayEnd::Closed,
    };
    shutdown_fd(client.fd(), Shutdown::Both);
    shutdown_fd(backend.fd(), Shutdown::Both);
    let (a, b) = both.await;
    (end, a, b)
}
