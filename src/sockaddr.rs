//! Address helpers shared by the data plane and the health checks.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// The local address a UDP socket toward `peer` binds to: the wildcard of
/// the peer's family with an ephemeral port, so the kernel picks the source
/// address by route (the one choice for UDP flows and UDP health checks).
pub fn udp_local_for(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wildcard_of_the_peers_family() {
        assert_eq!(
            udp_local_for("10.0.0.1:53".parse().unwrap()),
            "0.0.0.0:0".parse().unwrap()
        );
        assert_eq!(udp_local_for("[::1]:53".parse().unwrap()), "[::]:0".parse().unwrap());
    }
}
