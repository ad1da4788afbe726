//! Per-datagram rewriting before a forward: the routing token read (and stripped) and the PROXY v2 header prepended.
//!
//! Pure: it works on the receive buffer in place and returns where the
//! datagram to send now lies, so it is unit-tested and benchmarked without
//! sockets (bench/micro/udp_datagram.rs).

use std::net::SocketAddr;
use std::ops::Range;

use crate::config::{ProxyProtocol, TokenConfig};

/// The datagram is too short to carry the listener's token (dropped and
/// counted as `datagrams_short`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short;

/// Prepares `buf[payload]`, a datagram from `client` to `local`, for its
/// backend: with `token`, hashes the token bytes (returned) and removes
/// them when `strip` is set; with PROXY v2, writes the header into the
/// bytes before the payload, which must have room for it
/// ([`crate::proxy::proxy_protocol::MAX_V2_HEADER`]). Returns the token's
/// hash, if any, and the range of `buf` to send.
#[inline]
pub fn prepare(
    token: Option<&TokenConfig>,
    proxy: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    buf: &mut [u8],
    payload: Range<usize>,
) -> Result<(Option<u64>, Range<usize>), Short> {
    let (mut start, mut end) = (payload.start, payload.end);
    let hash = match token {
        None => None,
        Some(t) => {
            let at = t.locate(end - start).ok_or(Short)?;
            let (a, b) = (start + at.start, start + at.end);
            let hash = crate::flow_key::token_hash(&buf[a..b]);
            if t.strip {
                if b == end {
                    end = a;
                } else if a == start {
                    start = b;
                } else {
                    // In the middle: close the gap (at most one datagram's copy).
                    buf.copy_within(b..end, a);
                    end -= b - a;
                }
            }
            Some(hash)
        }
    };
    if proxy == ProxyProtocol::V2 {
        // Into the room before the payload: header and payload go out as one
        // datagram with no copy of the payload.
        let header = crate::proxy::proxy_protocol::dgram_header(client, local);
        let h = header.bytes();
        start -= h.len();
        buf[start..start + h.len()].copy_from_slice(h);
    }
    Ok((hash, start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: usize = 64;

    fn run(token: Option<TokenConfig>, proxy: ProxyProtocol, data: &[u8]) -> Result<(Option<u64>, Vec<u8>), Short> {
        let mut buf = vec![0u8; HEAD + data.len()];
        buf[HEAD..].copy_from_slice(data);
        let (c, l) = ("192.0.2.7:5000".parse().unwrap(), "198.51.100.1:7777".parse().unwrap());
        let (hash, r) = prepare(token.as_ref(), proxy, c, l, &mut buf, HEAD..HEAD + data.len())?;
        Ok((hash, buf[r].to_vec()))
    }

    fn tok(offset: i32, length: u16, strip: bool) -> Option<TokenConfig> {
        Some(TokenConfig { offset, length, strip })
    }

    #[test]
    fn off_leaves_the_datagram_alone() {
        assert_eq!(run(None, ProxyProtocol::Off, b"abc").unwrap(), (None, b"abc".to_vec()));
    }

    #[test]
    fn token_is_hashed_kept_or_stripped_wherever_it_is() {
        let want = Some(crate::flow_key::token_hash(b"TOKN"));
        assert_eq!(
            run(tok(-4, 4, false), ProxyProtocol::Off, b"dataTOKN").unwrap(),
            (want, b"dataTOKN".to_vec())
        );
        assert_eq!(
            run(tok(-4, 4, true), ProxyProtocol::Off, b"dataTOKN").unwrap(),
            (want, b"data".to_vec())
        );
        assert_eq!(
            run(tok(0, 4, true), ProxyProtocol::Off, b"TOKNdata").unwrap(),
            (want, b"data".to_vec())
        );
        assert_eq!(
            run(tok(2, 4, true), ProxyProtocol::Off, b"daTOKNta").unwrap(),
            (want, b"data".to_vec())
        );
        assert_eq!(
            run(tok(-6, 4, true), ProxyProtocol::Off, b"daTOKNta").unwrap(),
            (want, b"data".to_vec())
        );
        // A token that is the whole datagram leaves nothing.
        assert_eq!(
            run(tok(0, 4, true), ProxyProtocol::Off, b"TOKN").unwrap(),
            (want, vec![])
        );
        assert_eq!(run(tok(-4, 4, false), ProxyProtocol::Off, b"TOK"), Err(Short));
        assert_eq!(run(tok(2, 4, false), ProxyProtocol::Off, b"xxTOK"), Err(Short));
    }

    #[test]
    fn proxy_header_goes_in_front_of_what_is_left() {
        let (hash, out) = run(tok(-4, 4, true), ProxyProtocol::V2, b"dataTOKN").unwrap();
        assert!(hash.is_some());
        let h = crate::proxy::proxy_protocol::dgram_header(
            "192.0.2.7:5000".parse().unwrap(),
            "198.51.100.1:7777".parse().unwrap(),
        );
        assert_eq!(&out[..h.bytes().len()], h.bytes());
        assert_eq!(&out[h.bytes().len()..], b"data");
        let (_, out) = run(None, ProxyProtocol::V2, b"").unwrap();
        assert_eq!(out, h.bytes());
    }
}
