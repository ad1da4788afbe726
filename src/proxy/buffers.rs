//! Per-worker buffer pool: relay buffers are reused, never allocated per read.
//!
//! The epoll loop takes a large buffer only for a read the kernel said is
//! ready and gives it back once the chunk is sent on, so idle connections
//! pin none. (The io_uring loop does not use this pool: it receives into
//! its provided-buffer ring.) The small size is not used by either loop.

use std::cell::RefCell;

/// Size of the buffer parked by an idle read.
pub const SMALL_BUF: usize = 1024;
/// Size of the buffer used while data flows.
pub const LARGE_BUF: usize = 64 * 1024;
/// Free large buffers kept per worker (the rest are freed): 8 MiB.
const MAX_FREE_LARGE: usize = 128;
/// Free small buffers kept per worker: 4 MiB.
const MAX_FREE_SMALL: usize = 4096;

/// A worker's pool of relay buffers.
#[derive(Default)]
pub struct BufPool {
    small: RefCell<Vec<Vec<u8>>>,
    large: RefCell<Vec<Vec<u8>>>,
}

impl BufPool {
    /// Takes a buffer of `SMALL_BUF` or `LARGE_BUF` capacity.
    pub fn take(&self, large: bool) -> Vec<u8> {
        let (free, size) = if large {
            (&self.large, LARGE_BUF)
        } else {
            (&self.small, SMALL_BUF)
        };
        free.borrow_mut().pop().unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// Returns a buffer; past the cap it is freed.
    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let (free, cap) = if buf.capacity() >= LARGE_BUF {
            (&self.large, MAX_FREE_LARGE)
        } else {
            (&self.small, MAX_FREE_SMALL)
        };
        let mut free = free.borrow_mut();
        if free.len() < cap {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_caps() {
        let pool = BufPool::default();
        let a = pool.take(true);
        assert_eq!(a.capacity(), LARGE_BUF);
        let ptr = a.as_ptr();
        pool.give(a);
        let again = pool.take(true);
        assert_eq!(again.as_ptr(), ptr);
        for _ in 0..MAX_FREE_LARGE + 10 {
            pool.give(Vec::with_capacity(LARGE_BUF));
        }
        assert_eq!(pool.large.borrow().len(), MAX_FREE_LARGE);
        assert_eq!(pool.take(false).capacity(), SMALL_BUF);
    }
}
