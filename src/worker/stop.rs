//! A listener's stop signal: a flag plus the worker loops to wake. Its own
//! file, below both the worker context and the UDP listener that hold one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::waker::Waker;

/// A stop request for one listener's accept loops.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    /// Worker loops to wake when stopped (they check the flag then).
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl StopSignal {
    /// Asks every waiter to stop; idempotent.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for w in self.wakers.lock().iter() {
            w.wake();
        }
    }

    /// Whether stop was asked.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Wakes `waker` when stopped (at once if it already is).
    pub fn register(&self, waker: Arc<Waker>) {
        let mut wakers = self.wakers.lock();
        if self.is_stopped() {
            waker.wake();
        }
        if !wakers.iter().any(|w| Arc::ptr_eq(w, &waker)) {
            wakers.push(waker);
        }
    }
}
