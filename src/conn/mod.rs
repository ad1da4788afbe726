//! The sans-io TCP connection core: one state machine per proxied connection.
//!
//! The io engines (the io_uring completion loop and the epoll readiness
//! loop) are shells around it: they turn completions or readiness into
//! events, feed them to a [`Conn`], and carry out the [`Op`]s it returns.
//! Admission, the backend preference walk, connect retries, the PROXY
//! header, idle timeout, half-close, drains and the counters are written
//! here once, for both engines, and tested event by event without a socket
//! or a clock.

pub mod machine;
mod preread;
pub mod select;
pub mod timer_wheel;

pub use machine::{Conn, ConnParams, Data, Errno, Op, Side, Via};
pub use select::{select, Selection};
pub use timer_wheel::TimerWheel;
