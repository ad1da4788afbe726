//! The TCP data plane: accept loops, backend choice with retry, and the relay.

pub mod buffers;
pub mod proxy_protocol;
pub mod relay;
pub mod splice;
pub mod tcp;
