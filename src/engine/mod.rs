//! io engines: the event loops that carry out the connection core's
//! operations. The io_uring loop ([`ring`]) and the epoll loop
//! ([`readiness`]) are the only code that differs between the engines;
//! everything about a connection is decided once, in [`crate::conn`].

pub mod driver;
pub mod listener;
pub mod pipe;
pub mod probe;
pub mod readiness;
pub mod ring;
pub mod slab;
pub mod sockets;
pub mod spawn;
pub mod steering;
pub mod token;

pub use crate::worker::IoEngine;
pub use probe::{probe_io_uring, resolve_engine};
