//! Parsing a PROXY protocol header (v1 text, v2 binary) sent by a balancer in front.
//!
//! Pure and bounded: [`parse`] looks at the bytes read so far and says the
//! header is incomplete, complete (its length and the addresses it carries),
//! or not acceptable and why. It never reads past [`MAX_HEADER`] bytes and
//! never allocates. ringlb's own parser rather than a crate (`ppp`): it is
//! ~200 lines, has to stop at a byte bound of ours, must say "incomplete"
//! for a header split over reads without copying, and the crate would be a
//! dependency for that alone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The most bytes a header may have (v2 with its TLVs included); a longer
/// one is refused as oversized. v1 lines are at most 107 bytes by the spec.
pub const MAX_HEADER: usize = 2048;
/// The longest v1 line, CRLF included.
pub const MAX_V1: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
const V1_PREFIX: &[u8] = b"PROXY ";

/// Which versions a listener accepts (`accept_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Only the text header.
    V1,
    /// Only the binary header.
    V2,
    /// Either.
    Any,
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Its length: the client's own bytes start here.
    pub len: usize,
    /// `(source, destination)` for a relayed connection; `None` for v2
    /// `LOCAL`, v1 `UNKNOWN` or an address family without addresses: the
    /// connection is served with its own addresses.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Which version it was (1 or 2).
    pub version: u8,
    /// TLVs that followed the v2 addresses (each checked to fit).
    pub tlvs: u16,
}

/// Why a header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes are not a PROXY header of an accepted version.
    NotProxy,
    /// It would be longer than [`MAX_HEADER`] (or a v1 line than 107 bytes).
    Oversized,
    /// Its contents break the spec (the reason).
    Malformed(&'static str),
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::NotProxy => f.write_str("not a PROXY protocol header"),
            ProxyError::Oversized => f.write_str("PROXY header too long"),
            ProxyError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
        }
    }
}

/// Parses the start of a connection: `Ok(None)` means more bytes are
/// needed (the bytes so far are a valid beginning).
pub fn parse(buf: &[u8], accept: Accept) -> Result<Option<Parsed>, ProxyError> {
    let v1_ok = accept != Accept::V2;
    let v2_ok = accept != Accept::V1;
    if v2_ok && starts_like(buf, &V2_SIGNATURE) {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    if v1_ok && starts_like(buf, V1_PREFIX) {
        return if buf.len() < V1_PREFIX.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    if buf.is_empty() {
        return Ok(None);
    }
    Err(ProxyError::NotProxy)
}

/// Whether `buf` and `sig` agree on their common length.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= MAX_V1 {
            Err(ProxyError::Oversized)
        } else {
            Ok(None)
        };
    };
    if buf[cr] == b'\n' {
        return Err(ProxyError::Malformed("v1 line ends without CR"));
    }
    if cr + 2 > MAX_V1 {
        // The LF would be byte 108 (found by fuzzing: the verdict used to
        // depend on the byte after the CR).
        return Err(ProxyError::Oversized);
    }
    if cr + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[cr + 1] != b'\n' {
        return Err(ProxyError::Malformed("v1 line: CR not followed by LF"));
    }
    let len = cr + 2;
    let line =
        std::str::from_utf8(&buf[V1_PREFIX.len()..cr]).map_err(|_| ProxyError::Malformed("v1 line is not ASCII"))?;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored (spec 2.1).
        return Ok(Some(Parsed {
            len,
            addrs: None,
            version: 1,
            tlvs: 0,
        }));
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(ProxyError::Malformed("v1 family is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::Malformed("v1 line needs 4 fields after the family"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let parsed: Result<IpAddr, _> = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        parsed.map_err(|_| ProxyError::Malformed("v1 address does not match its family"))
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        // Decimal, no sign, no leading zero (spec 2.1).
        let ok =
            !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
        let p = if ok { s.parse::<u16>().ok() } else { None };
        p.ok_or(ProxyError::Malformed("v1 port is not a number 0..=65535"))
    };
    let src = SocketAddr::new(ip(src)?, port(sport)?);
    let dst = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Some(Parsed {
        len,
        addrs: Some((src, dst)),
        version: 1,
        tlvs: 0,
    }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    if buf.len() < 16 {
        if buf.len() > 12 && buf[12] >> 4 != 2 {
            return Err(ProxyError::Malformed("v2 version is not 2"));
        }
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version is not 2"));
    }
    let local = match ver_cmd & 0x0F {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::Malformed("v2 command is not LOCAL or PROXY")),
    };
    let fam = buf[13];
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err(ProxyError::Oversized);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    // Address block size per family (spec 2.2); UNSPEC and UNIX carry no
    // address ringlb could use.
    let (addr_len, v6) = match fam >> 4 {
        0 => (0, false),
        1 => (12, false),
        2 => (36, true),
        3 => (216, false),
        _ => return Err(ProxyError::Malformed("v2 address family unknown")),
    };
    let transport = fam & 0x0F;
    if transport > 2 {
        return Err(ProxyError::Malformed("v2 transport unknown"));
    }
    if body.len() < addr_len {
        return Err(ProxyError::Malformed("v2 length shorter than its addresses"));
    }
    let mut addrs = None;
    if !local && (fam >> 4 == 1 || fam >> 4 == 2) {
        if transport != 1 {
            return Err(ProxyError::Malformed("v2 transport is not STREAM on a TCP listener"));
        }
        let a = &body[..addr_len];
        addrs = Some(if v6 {
            let src: [u8; 16] = a[0..16].try_into().expect("16 bytes");
            let dst: [u8; 16] = a[16..32].try_into().expect("16 bytes");
            (
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), u16::from_be_bytes([a[32], a[33]])),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(dst)), u16::from_be_bytes([a[34], a[35]])),
            )
        } else {
            (
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
                    u16::from_be_bytes([a[8], a[9]]),
                ),
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(a[4], a[5], a[6], a[7])),
                    u16::from_be_bytes([a[10], a[11]]),
                ),
            )
        });
    }
    // TLVs: type, 16-bit length, value; each must fit exactly.
    let mut tlvs = &body[addr_len..];
    let mut count = 0u16;
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(ProxyError::Malformed("v2 TLV cut short"));
        }
        let n = u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        if tlvs.len() < 3 + n {
            return Err(ProxyError::Malformed("v2 TLV longer than the header"));
        }
        tlvs = &tlvs[3 + n..];
        count = count.saturating_add(1);
    }
    Ok(Some(Parsed {
        len,
        addrs,
        version: 2,
        tlvs: count,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::proxy_protocol::{header, local_header, ProxyProtocol};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_ipv4_and_ipv6_with_data_after() {
        let mut b = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec();
        let n = b.len();
        b.extend_from_slice(b"GET /");
        let p = parse(&b, Accept::Any).unwrap().unwrap();
        assert_eq!(p.len, n);
        assert_eq!(p.addrs, Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443"))));
        let b = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        let p = parse(b, Accept::V1).unwrap().unwrap();
        assert_eq!(p.addrs, Some((sa("[2001:db8::1]:1"), sa("[::1]:65535"))));
        assert_eq!(parse(b, Accept::V2), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v1_unknown_is_served_with_own_addresses() {
        let p = parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", Accept::V1)
            .unwrap()
            .unwrap();
        assert_eq!(p.addrs, None);
        assert_eq!(parse(b"PROXY UNKNOWN\r\n", Accept::V1).unwrap().unwrap().len, 15);
    }

    #[test]
    fn every_split_of_a_header_is_incomplete_until_the_end() {
        let l = local_header(ProxyProtocol::V2).unwrap();
        let all = [
            header(ProxyProtocol::V1, sa("10.0.0.1:5"), sa("10.0.0.2:80"))
                .unwrap()
                .bytes()
                .to_vec(),
            header(ProxyProtocol::V2, sa("[2001:db8::1]:5"), sa("[::1]:80"))
                .unwrap()
                .bytes()
                .to_vec(),
            header(ProxyProtocol::V2, sa("10.0.0.1:5"), sa("10.0.0.2:80"))
                .unwrap()
                .bytes()
                .to_vec(),
            l.bytes().to_vec(),
        ];
        for h in &all {
            for cut in 0..h.len() {
                assert_eq!(parse(&h[..cut], Accept::Any), Ok(None), "{h:?} cut at {cut}");
            }
            assert_eq!(parse(h, Accept::Any).unwrap().unwrap().len, h.len());
        }
    }

    #[test]
    fn what_our_own_writer_sends_reads_back() {
        for (c, l) in [
            ("10.1.2.3:4000", "10.9.9.9:443"),
            ("[2001:db8::7]:9", "[2001:db8::1]:443"),
        ] {
            for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
                let h = header(v, sa(c), sa(l)).unwrap();
                let p = parse(h.bytes(), Accept::Any).unwrap().unwrap();
                assert_eq!(p.addrs, Some((sa(c), sa(l))));
            }
        }
        assert_eq!(
            parse(local_header(ProxyProtocol::V2).unwrap().bytes(), Accept::V2)
                .unwrap()
                .unwrap()
                .addrs,
            None
        );
        assert_eq!(
            parse(local_header(ProxyProtocol::V1).unwrap().bytes(), Accept::V1)
                .unwrap()
                .unwrap()
                .addrs,
            None
        );
    }

    #[test]
    fn v2_tlvs_are_counted_and_must_fit() {
        let mut body = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x13, 0x88, 0x01, 0xBB];
        body.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'b', b'c']); // authority
        body.extend_from_slice(&[0x05, 0x00, 0x00]); // unique id, empty
        let p = parse(&v2(0x21, 0x11, &body), Accept::V2).unwrap().unwrap();
        assert_eq!(p.tlvs, 2);
        assert_eq!(p.addrs, Some((sa("10.0.0.1:5000"), sa("10.0.0.2:443"))));
        let mut bad = body.clone();
        bad.extend_from_slice(&[0x04, 0x00]);
        assert_eq!(
            parse(&v2(0x21, 0x11, &bad), Accept::V2),
            Err(ProxyError::Malformed("v2 TLV cut short"))
        );
        let mut bad = body;
        bad.extend_from_slice(&[0x04, 0x00, 0x09, 1]);
        assert_eq!(
            parse(&v2(0x21, 0x11, &bad), Accept::V2),
            Err(ProxyError::Malformed("v2 TLV longer than the header"))
        );
    }

    #[test]
    fn hostile_headers_are_refused() {
        let cases: &[(&[u8], ProxyError)] = &[
            (b"GET / HTTP/1.1\r\n", ProxyError::NotProxy),
            (b"\x16\x03\x01\x02\x00", ProxyError::NotProxy),
            (
                b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
                ProxyError::Malformed("v1 family is not TCP4, TCP6 or UNKNOWN"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
                ProxyError::Malformed("v1 line needs 4 fields after the family"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
                ProxyError::Malformed("v1 line needs 4 fields after the family"),
            ),
            (
                b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
                ProxyError::Malformed("v1 address does not match its family"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
                ProxyError::Malformed("v1 port is not a number 0..=65535"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
                ProxyError::Malformed("v1 port is not a number 0..=65535"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
                ProxyError::Malformed("v1 port is not a number 0..=65535"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
                ProxyError::Malformed("v1 line ends without CR"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX",
                ProxyError::Malformed("v1 line: CR not followed by LF"),
            ),
            (
                b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
                ProxyError::Malformed("v1 family is not TCP4, TCP6 or UNKNOWN"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input, Accept::Any),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // A v1 line that never ends within 107 bytes.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(parse(&long, Accept::V1), Err(ProxyError::Oversized));
        assert_eq!(parse(&long[..106], Accept::V1), Ok(None));
        // A CR as byte 107: the LF could only be byte 108, over the limit.
        let mut cr_last = long[..106].to_vec();
        cr_last.push(b'\r');
        assert_eq!(parse(&cr_last, Accept::V1), Err(ProxyError::Oversized));
        cr_last.push(b'\n');
        assert_eq!(parse(&cr_last, Accept::V1), Err(ProxyError::Oversized));
        // v2: wrong version, command, family, transport, short body, oversized length.
        assert_eq!(
            parse(&v2(0x11, 0x11, &[0; 12]), Accept::V2),
            Err(ProxyError::Malformed("v2 version is not 2"))
        );
        assert_eq!(
            parse(&v2(0x22, 0x11, &[0; 12]), Accept::V2),
            Err(ProxyError::Malformed("v2 command is not LOCAL or PROXY"))
        );
        assert_eq!(
            parse(&v2(0x21, 0x41, &[0; 12]), Accept::V2),
            Err(ProxyError::Malformed("v2 address family unknown"))
        );
        assert_eq!(
            parse(&v2(0x21, 0x12, &[0; 12]), Accept::V2),
            Err(ProxyError::Malformed("v2 transport is not STREAM on a TCP listener"))
        );
        assert_eq!(
            parse(&v2(0x21, 0x21, &[0; 12]), Accept::V2),
            Err(ProxyError::Malformed("v2 length shorter than its addresses"))
        );
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&huge, Accept::Any), Err(ProxyError::Oversized));
        // Only the accepted version.
        assert_eq!(parse(&v2(0x21, 0x11, &[0; 12]), Accept::V1), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_local_and_unspec_keep_own_addresses() {
        assert_eq!(parse(&v2(0x20, 0x00, &[]), Accept::V2).unwrap().unwrap().addrs, None);
        assert_eq!(parse(&v2(0x21, 0x00, &[]), Accept::V2).unwrap().unwrap().addrs, None);
        assert_eq!(
            parse(&v2(0x21, 0x31, &[0; 216]), Accept::V2).unwrap().unwrap().addrs,
            None
        );
        // LOCAL with an address block: the addresses are ignored.
        assert_eq!(
            parse(&v2(0x20, 0x11, &[1; 12]), Accept::V2).unwrap().unwrap().addrs,
            None
        );
    }
}
