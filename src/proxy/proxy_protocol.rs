//! PROXY protocol headers (v1 text, v2 binary) that tell a backend who the client is.
//!
//! An L4 balancer hides the client's address from the backend; a header sent
//! first on the backend connection (HAProxy's `send-proxy`, nginx's
//! `proxy_protocol on`) gives it back. Both versions are built here into a
//! fixed buffer, with no allocation, from the client's address and the
//! address it connected to.

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Whether, and in which version, a TCP listener tells its backends the
/// client's address with a PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// No header: backends see ringlb's address.
    Off,
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// The longest header either version writes (v1: 107 bytes; v2 with IPv6: 52).
pub const MAX_HEADER: usize = 108;

/// The v2 signature, then version 2.
const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Version 2, command PROXY (relayed on behalf of a client).
const V2_PROXY: u8 = 0x21;
/// Version 2, command LOCAL (a connection of the balancer's own, e.g. a check).
const V2_LOCAL: u8 = 0x20;
/// AF_INET / AF_INET6 with STREAM, in the family byte.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
/// AF_INET / AF_INET6 with DGRAM (UDP listeners: one header per datagram).
const V2_UDP4: u8 = 0x12;
const V2_UDP6: u8 = 0x22;
/// The longest v2 header with addresses (IPv6: 16 + 36 bytes).
pub const MAX_V2_HEADER: usize = 52;

/// A built header: `bytes()` is what goes to the backend first.
pub struct Header {
    buf: [u8; MAX_HEADER],
    len: usize,
}

impl Header {
    /// The header's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The header for a connection from `client` to `local` (the address the
/// client connected to), or None when `version` is off. Addresses of one
/// family are sent as that family; a v4 client on an IPv6 socket (mapped)
/// is sent as IPv4 when both ends are IPv4, else both as IPv6.
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Option<Header> {
    let mut h = Header {
        buf: [0; MAX_HEADER],
        len: 0,
    };
    let (src, dst) = same_family(client, local);
    match version {
        ProxyProtocol::Off => return None,
        ProxyProtocol::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut cursor = &mut h.buf[..];
            // Never fails: the longest line (two full IPv6 addresses) is 104 bytes.
            let _ = write!(
                cursor,
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            );
            h.len = MAX_HEADER - cursor.len();
        }
        ProxyProtocol::V2 => write_v2(&mut h, src, dst, false),
    }
    Some(h)
}

/// The v2 header that prefixes one datagram from `client` to `local` (the
/// address the client sent to): command PROXY, transport DGRAM. Families
/// are chosen as in [`header`].
#[inline]
pub fn dgram_header(client: SocketAddr, local: SocketAddr) -> Header {
    let mut h = Header {
        buf: [0; MAX_HEADER],
        len: 0,
    };
    let (src, dst) = same_family(client, local);
    write_v2(&mut h, src, dst, true);
    h
}

/// Writes a v2 PROXY header for `src` -> `dst` (of one family) into `h`.
fn write_v2(h: &mut Header, src: SocketAddr, dst: SocketAddr, dgram: bool) {
    h.buf[..12].copy_from_slice(&V2_SIGNATURE);
    h.buf[12] = V2_PROXY;
    let mut at = 16;
    let mut put = |bytes: &[u8]| {
        h.buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put(&s.octets());
            put(&d.octets());
        }
        (s, d) => {
            put(&to_v6(s).octets());
            put(&to_v6(d).octets());
        }
    }
    put(&src.port().to_be_bytes());
    put(&dst.port().to_be_bytes());
    h.buf[13] = match (src.is_ipv4(), dgram) {
        (true, false) => V2_TCP4,
        (false, false) => V2_TCP6,
        (true, true) => V2_UDP4,
        (false, true) => V2_UDP6,
    };
    h.buf[14..16].copy_from_slice(&((at - 16) as u16).to_be_bytes());
    h.len = at;
}

/// The header for a connection of ringlb's own (a health check): v1
/// `PROXY UNKNOWN`, v2 command LOCAL with no addresses; the backend uses the
/// connection's real addresses. None when `version` is off.
pub fn local_header(version: ProxyProtocol) -> Option<Header> {
    let mut h = Header {
        buf: [0; MAX_HEADER],
        len: 0,
    };
    match version {
        ProxyProtocol::Off => return None,
        ProxyProtocol::V1 => {
            let line = b"PROXY UNKNOWN\r\n";
            h.buf[..line.len()].copy_from_slice(line);
            h.len = line.len();
        }
        ProxyProtocol::V2 => {
            h.buf[..12].copy_from_slice(&V2_SIGNATURE);
            h.buf[12] = V2_LOCAL;
            // Family UNSPEC, no address block.
            h.len = 16;
        }
    }
    Some(h)
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmapped = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), s.port()),
            None => s,
        },
        IpAddr::V4(_) => s,
    };
    let (a4, b4) = (unmapped(a), unmapped(b));
    if a4.is_ipv4() && b4.is_ipv4() {
        return (a4, b4);
    }
    let mapped = |s: SocketAddr| SocketAddr::new(IpAddr::V6(to_v6(s.ip())), s.port());
    (mapped(a), mapped(b))
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines_as_the_spec_writes_them() {
        let h = header(ProxyProtocol::V1, sa("192.0.2.7:56324"), sa("198.51.100.1:443")).unwrap();
        assert_eq!(h.bytes(), b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n");
        let h = header(ProxyProtocol::V1, sa("[2001:db8::7]:1"), sa("[::1]:5432")).unwrap();
        assert_eq!(h.bytes(), b"PROXY TCP6 2001:db8::7 ::1 1 5432\r\n");
        // Mapped IPv4 on both ends (a dual-stack listener) is sent as IPv4.
        let h = header(ProxyProtocol::V1, sa("[::ffff:10.0.0.1]:9"), sa("[::ffff:10.0.0.2]:80")).unwrap();
        assert_eq!(h.bytes(), b"PROXY TCP4 10.0.0.1 10.0.0.2 9 80\r\n");
        // One end IPv6: both as IPv6.
        let h = header(ProxyProtocol::V1, sa("10.0.0.1:9"), sa("[2001:db8::1]:80")).unwrap();
        assert_eq!(h.bytes(), b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::1 9 80\r\n");
    }

    #[test]
    fn the_longest_v1_line_fits() {
        let a = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535";
        let h = header(ProxyProtocol::V1, sa(a), sa(a)).unwrap();
        assert!(h.bytes().ends_with(b" 65535 65535\r\n"));
        assert!(h.bytes().len() <= 107, "{}", h.bytes().len());
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = header(ProxyProtocol::V2, sa("192.0.2.7:56324"), sa("198.51.100.1:443")).unwrap();
        let b = h.bytes();
        assert_eq!(b.len(), 16 + 12);
        assert_eq!(&b[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(b[12], 0x21, "version 2, PROXY");
        assert_eq!(b[13], 0x11, "TCP over IPv4");
        assert_eq!(u16::from_be_bytes([b[14], b[15]]), 12);
        assert_eq!(&b[16..20], &[192, 0, 2, 7]);
        assert_eq!(&b[20..24], &[198, 51, 100, 1]);
        assert_eq!(u16::from_be_bytes([b[24], b[25]]), 56324);
        assert_eq!(u16::from_be_bytes([b[26], b[27]]), 443);
    }

    #[test]
    fn v2_ipv6_layout() {
        let h = header(ProxyProtocol::V2, sa("[2001:db8::7]:1"), sa("[::1]:5432")).unwrap();
        let b = h.bytes();
        assert_eq!(b.len(), 16 + 36);
        assert_eq!(b[13], 0x21, "TCP over IPv6");
        assert_eq!(u16::from_be_bytes([b[14], b[15]]), 36);
        assert_eq!(&b[16..32], &"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&b[32..48], &Ipv6Addr::LOCALHOST.octets());
        assert_eq!(u16::from_be_bytes([b[48], b[49]]), 1);
        assert_eq!(u16::from_be_bytes([b[50], b[51]]), 5432);
    }

    #[test]
    fn v2_dgram_layout() {
        let b4 = dgram_header(sa("192.0.2.7:56324"), sa("198.51.100.1:7777"));
        let b = b4.bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(&b[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(b[12], 0x21, "version 2, PROXY");
        assert_eq!(b[13], 0x12, "UDP over IPv4");
        assert_eq!(&b[16..20], &[192, 0, 2, 7]);
        assert_eq!(u16::from_be_bytes([b[26], b[27]]), 7777);
        let b6 = dgram_header(sa("[2001:db8::7]:1"), sa("[::1]:5432"));
        let b = b6.bytes();
        assert_eq!(b.len(), MAX_V2_HEADER);
        assert_eq!(b[13], 0x22, "UDP over IPv6");
        assert_eq!(u16::from_be_bytes([b[14], b[15]]), 36);
        // The stream header for the same addresses differs only in the family byte.
        let tcp = header(ProxyProtocol::V2, sa("[2001:db8::7]:1"), sa("[::1]:5432")).unwrap();
        assert_eq!(&tcp.bytes()[..13], &b[..13]);
        assert_eq!(&tcp.bytes()[14..], &b[14..]);
    }

    #[test]
    fn own_connections_say_so() {
        assert_eq!(local_header(ProxyProtocol::V1).unwrap().bytes(), b"PROXY UNKNOWN\r\n");
        let v2 = local_header(ProxyProtocol::V2).unwrap();
        assert_eq!(v2.bytes().len(), 16);
        assert_eq!(v2.bytes()[12], 0x20, "version 2, LOCAL");
        assert_eq!(&v2.bytes()[13..16], &[0, 0, 0]);
        assert!(local_header(ProxyProtocol::Off).is_none());
        assert!(header(ProxyProtocol::Off, sa("1.2.3.4:5"), sa("1.2.3.4:6")).is_none());
    }
}
