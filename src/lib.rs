//! ringlb: an L4 TCP/UDP load balancer for Linux on io_uring.
pub mod admission;
pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod engine;
pub mod fd_reserve;
pub mod flow_key;
#[doc(hidden)]
pub mod fuzzing;
pub mod geo;
pub mod health;
pub mod listen;
pub mod maglev;
pub mod model;
pub mod output;
pub mod proxy;
pub mod server;
pub mod snapshot;
pub mod state_file;
pub mod stats;
pub mod systemd;
pub mod udp;
pub mod worker;
