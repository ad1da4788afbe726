//! The worker context: what each worker's native event loop (io_uring or
//! epoll) is given, the commands the control plane sends it through a
//! bounded queue and an eventfd ([`waker`]), and listener stop signals.
//! The loops themselves are `crate::engine`, which imports this module;
//! `engine::spawn` starts the threads.

pub mod context;
pub mod stop;
pub mod waker;

pub use context::*;
