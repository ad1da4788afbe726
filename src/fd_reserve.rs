//! Descriptors held back for when the process has no more to open.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Pause after an accept error that a spare cannot fix.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A few open descriptors (of `/dev/null`) kept in hand. When the data
/// plane has used every descriptor the process may open, accept fails with
/// EMFILE and the client would wait in the backlog; giving one spare back
/// lets the next accept succeed. Workers use theirs to accept and reset
/// waiting clients at once; the control socket and metrics listener use
/// theirs to answer, so `ringlb ctl stats` and `/metrics` work at the moment
/// an operator most needs them. (HAProxy keeps such headroom by deriving its
/// maxconn from the descriptor limit; ringlb lets the data plane use every
/// descriptor and keeps the headroom here instead.)
pub struct FdReserve {
    spare: Mutex<Vec<File>>,
    /// `spare.len()`, readable without the lock (checked per accepted client).
    held: AtomicUsize,
    size: usize,
}

impl FdReserve {
    /// Opens up to `size` spares now (fewer if the process is already out).
    pub fn new(size: usize) -> FdReserve {
        let reserve = FdReserve {
            spare: Mutex::new(Vec::with_capacity(size)),
            held: AtomicUsize::new(0),
            size,
        };
        reserve.refill();
        reserve
    }

    /// Tops the reserve back up; stops quietly while the process is still
    /// out of descriptors and tries again on the next call.
    pub fn refill(&self) {
        let mut spare = self.spare.lock();
        while spare.len() < self.size {
            match File::open("/dev/null") {
                Ok(f) => spare.push(f),
                Err(_) => break,
            }
        }
        self.held.store(spare.len(), Ordering::Relaxed);
    }

    /// Fewer spares than wanted: one was given up, or could not be opened
    /// again yet. A load, no lock or syscall.
    pub fn is_short(&self) -> bool {
        self.held.load(Ordering::Relaxed) < self.size
    }

    /// Closes one spare so the next descriptor opened can take its number;
    /// false if none was held.
    pub fn release_one(&self) -> bool {
        let mut spare = self.spare.lock();
        let released = spare.pop().is_some();
        self.held.store(spare.len(), Ordering::Relaxed);
        released
    }

    /// Accepts the next client on `listener` with `accept`. Out of
    /// descriptors with a client waiting, gives up a spare and retries at
    /// once; otherwise waits [`ACCEPT_BACKOFF`] so a persistent error never
    /// spins. (Linux reports EMFILE before it looks for a waiting client, so
    /// a spare given up with no client waiting would go to whoever opens a
    /// descriptor next, not to this listener.)
    pub async fn accept<T, Fut>(&self, listener: BorrowedFd<'_>, mut accept: impl FnMut() -> Fut) -> T
    where
        Fut: Future<Output = io::Result<T>>,
    {
        let mut retry_now = false;
        loop {
            if !retry_now {
                self.refill();
            }
            match accept().await {
                Ok(client) => return client,
                Err(e) => {
                    retry_now = is_out_of_descriptors(&e) && client_waiting(listener) && self.release_one();
                    if !retry_now {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            }
        }
    }

    /// Spares held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// A connection waits in `listener`'s accept queue (a zero-timeout poll).
pub fn client_waiting(listener: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd with a zero timeout never blocks or writes
    // beyond `pfd`.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// EMFILE (this process) or ENFILE (the whole system).
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_released_one_at_a_time_and_refilled() {
        let reserve = FdReserve::new(2);
        assert_eq!(reserve.held(), 2);
        assert!(!reserve.is_short());
        assert!(reserve.release_one());
        assert!(reserve.release_one());
        assert!(!reserve.release_one(), "none left");
        assert!(reserve.is_short());
        reserve.refill();
        assert_eq!(reserve.held(), 2);
    }

    #[test]
    fn only_running_out_of_descriptors_counts() {
        assert!(is_out_of_descriptors(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_out_of_descriptors(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    #[test]
    fn a_waiting_client_is_seen_without_accepting_it() {
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!client_waiting(listener.as_fd()));
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(client_waiting(listener.as_fd()));
        assert!(client_waiting(listener.as_fd()), "still waiting: poll does not accept");
        let _ = listener.accept().unwrap();
        assert!(!client_waiting(listener.as_fd()));
    }
}
