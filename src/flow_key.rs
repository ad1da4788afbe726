//! The flow key a Maglev lookup hashes: client IP, and port when asked.

use std::net::{IpAddr, SocketAddr};

use crate::config::HashKey;

/// Seed of the flow-key hash. Part of ringlb's fleet contract: every instance
/// must hash a client the same way to pick the same backend.
pub const FLOW_HASH_SEED: u64 = 0x7269_6e67_6c62_0001;

/// Hashes a client address for a Maglev lookup. IPv4 addresses hash as their
/// IPv4-mapped IPv6 form, so `1.2.3.4` and `::ffff:1.2.3.4` are one client.
#[inline]
pub fn flow_hash(client: SocketAddr, key: HashKey) -> u64 {
    let mut bytes = [0u8; 18];
    let v6 = match client.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    bytes[..16].copy_from_slice(&v6.octets());
    if key == HashKey::SrcIpPort {
        bytes[16..].copy_from_slice(&client.port().to_be_bytes());
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, FLOW_HASH_SEED)
}

/// Hashes a routing token (`hash_key = "token"`) for a Maglev lookup: the
/// token bytes alone, with the same fleet seed, so every instance sends a
/// token to the same backend whatever address carries it.
#[inline]
pub fn token_hash(token: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(token, FLOW_HASH_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_golden_value_never_changes() {
        // Part of the fleet contract, like the address hash.
        assert_eq!(
            token_hash(b"0123456789abcdef"),
            xxhash_rust::xxh3::xxh3_64_with_seed(b"0123456789abcdef", FLOW_HASH_SEED)
        );
        assert_ne!(token_hash(b"0123456789abcdef"), token_hash(b"0123456789abcdeg"));
    }

    #[test]
    fn src_ip_ignores_port_and_src_ip_port_does_not() {
        let a: SocketAddr = "10.1.2.3:1000".parse().unwrap();
        let b: SocketAddr = "10.1.2.3:2000".parse().unwrap();
        assert_eq!(flow_hash(a, HashKey::SrcIp), flow_hash(b, HashKey::SrcIp));
        assert_ne!(flow_hash(a, HashKey::SrcIpPort), flow_hash(b, HashKey::SrcIpPort));
    }

    #[test]
    fn v4_and_mapped_v6_are_one_client() {
        let a: SocketAddr = "10.1.2.3:1000".parse().unwrap();
        let b: SocketAddr = "[::ffff:10.1.2.3]:1000".parse().unwrap();
        assert_eq!(flow_hash(a, HashKey::SrcIpPort), flow_hash(b, HashKey::SrcIpPort));
    }

    #[test]
    fn golden_value_never_changes() {
        // Changing this changes which backend every client of a fleet lands on.
        let a: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        assert_eq!(flow_hash(a, HashKey::SrcIpPort), flow_hash(a, HashKey::SrcIpPort));
        let expected = xxhash_rust::xxh3::xxh3_64_with_seed(
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1, 0x9c, 0x40],
            FLOW_HASH_SEED,
        );
        assert_eq!(flow_hash(a, HashKey::SrcIpPort), expected);
    }
}
