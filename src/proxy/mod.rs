//! What the TCP data plane uses besides the connection core: relay buffers,
//! the PROXY protocol header (written and accepted) and the ClientHello's SNI.

pub mod buffers;
pub mod client_hello;
pub mod proxy_accept;
pub mod proxy_protocol;
