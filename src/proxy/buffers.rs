//! Per-worker buffer pool: relay buffers are reused, never allocated per read.
//!
//! The epoll loop takes a large buffer only for a read the kernel said is
//! ready and gives it back once the chunk is sent on, so idle connections
//! pin none. (The io_uring loop does not use this pool: it receives into
//! its provided-buffer ring.)

use std::cell::RefCell;

/// Size of a relay buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// Free buffers kept per worker (the rest are freed): 8 MiB.
const MAX_FREE: usize = 128;

/// A worker's pool of relay buffers.
#[derive(Default)]
pub struct BufPool {
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufPool {
    /// Takes a buffer of `BUF_SIZE` capacity.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
    }

    /// Returns a buffer; past the cap it is freed.
    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < MAX_FREE && buf.capacity() >= BUF_SIZE {
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
        let a = pool.take();
        assert_eq!(a.capacity(), BUF_SIZE);
        let ptr = a.as_ptr();
        pool.give(a);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr);
        for _ in 0..MAX_FREE + 10 {
            pool.give(Vec::with_capacity(BUF_SIZE));
        }
        assert_eq!(pool.free.borrow().len(), MAX_FREE);
    }
}
