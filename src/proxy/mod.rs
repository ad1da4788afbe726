//! What the TCP data plane uses besides the connection core: relay buffers
//! and the PROXY protocol header.

pub mod buffers;
pub mod proxy_protocol;
