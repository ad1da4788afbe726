//! UDP balancing: per-flow backend choice with a bounded flow table.
pub mod datagram;
pub mod flow;
pub mod flow_poller;
pub mod flow_table;
pub mod forwarder;
pub mod mmsg;
pub mod proxy;
pub mod recv_batch;
pub mod send_batch;
pub mod uring_batch;
