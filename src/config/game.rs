//! Game-server listener settings: `[listener.token]` (token routing) and `source` (transparent source).

use std::ops::Range;

use serde::Deserialize;

use super::validate::Checker;
use super::{HashKey, Protocol};

/// Longest token a listener may route by (a QUIC connection id is at most 20
/// bytes, Quilkin-style tokens are 16; 64 leaves room without letting a
/// hash run over whole payloads).
pub const MAX_TOKEN_LEN: i64 = 64;
/// Farthest a token may sit from either end of a datagram.
pub const MAX_TOKEN_OFFSET: i64 = 65_507;

/// `[listener.token]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Where the token starts: bytes from the start, or from the end when negative.
    pub offset: Option<i64>,
    /// Token length in bytes.
    pub length: Option<i64>,
    /// Remove the token before forwarding.
    pub strip: Option<bool>,
}

/// Where a UDP listener finds the routing token in each datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenConfig {
    /// Bytes from the start (>= 0) or from the end (< 0) of the datagram.
    pub offset: i32,
    /// Token length, 1..=[`MAX_TOKEN_LEN`].
    pub length: u16,
    /// Remove the token before forwarding to the backend.
    pub strip: bool,
}

impl Default for TokenConfig {
    /// 16 bytes at the end of the datagram, kept.
    fn default() -> Self {
        TokenConfig {
            offset: -16,
            length: 16,
            strip: false,
        }
    }
}

impl TokenConfig {
    /// The token's byte range in a datagram of `len` bytes, or `None` when
    /// the datagram is too short to carry it.
    #[inline]
    pub fn locate(&self, len: usize) -> Option<Range<usize>> {
        let length = self.length as usize;
        let start = if self.offset >= 0 {
            self.offset as usize
        } else {
            len.checked_sub(self.offset.unsigned_abs() as usize)?
        };
        let end = start.checked_add(length)?;
        (end <= len).then_some(start..end)
    }
}

/// Which address a listener connects to its backends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceMode {
    /// ringlb's own address (the kernel picks it): the default.
    #[default]
    Balancer,
    /// The client's own address, with `IP_TRANSPARENT`: backends see the
    /// real client and must route their replies back through ringlb.
    Client,
}

/// Validates `source` and `[listener.token]` of one listener.
pub(super) fn validate_game(
    c: &mut Checker<'_>,
    place: &str,
    protocol: Protocol,
    hash_key: HashKey,
    source: &Option<String>,
    token: &Option<TokenFile>,
) -> (SourceMode, Option<TokenConfig>) {
    let source = match source.as_deref() {
        None | Some("balancer") => SourceMode::Balancer,
        Some("client") => SourceMode::Client,
        Some(other) => {
            c.err(
                &format!("{place}source"),
                format!("\"{other}\": expected balancer or client"),
            );
            SourceMode::Balancer
        }
    };
    if hash_key == HashKey::Token && protocol == Protocol::Tcp {
        c.err(&format!("{place}hash_key"), "token only applies to protocol = \"udp\"");
    }
    if token.is_some() && hash_key != HashKey::Token {
        c.err(&format!("{place}token"), "only applies with hash_key = \"token\"");
    }
    if hash_key != HashKey::Token {
        return (source, None);
    }
    let t = match token {
        None => return (source, Some(TokenConfig::default())),
        Some(t) => t,
    };
    let d = TokenConfig::default();
    let length = c.ranged(
        &format!("{place}token.length"),
        t.length,
        1,
        MAX_TOKEN_LEN,
        d.length as i64,
    );
    let offset = c.ranged(
        &format!("{place}token.offset"),
        t.offset,
        -MAX_TOKEN_OFFSET,
        MAX_TOKEN_OFFSET,
        d.offset as i64,
    );
    if offset < 0 && -offset < length {
        c.err(
            &format!("{place}token.offset"),
            format!("{offset} with length {length} runs past the end of the datagram (use offset <= -{length})"),
        );
    }
    let config = TokenConfig {
        offset: offset as i32,
        length: length as u16,
        strip: t.strip.unwrap_or(false),
    };
    (source, Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(offset: i32, length: u16) -> TokenConfig {
        TokenConfig {
            offset,
            length,
            strip: false,
        }
    }

    fn errors(listener_extra: &str, protocol: &str) -> Result<crate::config::Config, Vec<String>> {
        let text = format!(
            "[[listener]]\nname = \"g\"\nbind = \"127.0.0.1:7777\"\nprotocol = \"{protocol}\"\npool = \"p\"\n{listener_extra}\n[[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:9001\"\n"
        );
        crate::config::Config::parse(&text, std::path::Path::new("g.toml"))
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn token_listener_config() {
        let c = errors(
            "hash_key = \"token\"\nproxy_protocol = \"v2\"\nsource = \"client\"\n[listener.token]\noffset = -16\nlength = 16\nstrip = true\n",
            "udp",
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.hash_key, HashKey::Token);
        assert_eq!(l.proxy_protocol, crate::config::ProxyProtocol::V2);
        assert_eq!(l.source, SourceMode::Client);
        assert_eq!(
            l.token,
            Some(TokenConfig {
                offset: -16,
                length: 16,
                strip: true
            })
        );
        // Without [listener.token]: 16 bytes at the end, kept.
        let c = errors("hash_key = \"token\"\n", "udp").unwrap();
        assert_eq!(c.listeners[0].token, Some(TokenConfig::default()));
        let c = errors("", "udp").unwrap();
        assert_eq!(
            (c.listeners[0].token, c.listeners[0].source),
            (None, SourceMode::Balancer)
        );
    }

    #[test]
    fn bad_game_settings_name_file_key_and_problem() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "hash_key = \"token\"\n",
                "tcp",
                "g.toml: listener \"g\": hash_key: token only applies to protocol = \"udp\"",
            ),
            (
                "[listener.token]\nlength = 4\n",
                "udp",
                "listener \"g\": token: only applies with hash_key = \"token\"",
            ),
            (
                "hash_key = \"token\"\n[listener.token]\nlength = 0\n",
                "udp",
                "token.length: 0 is out of range (1..=64)",
            ),
            (
                "hash_key = \"token\"\n[listener.token]\noffset = -4\nlength = 8\n",
                "udp",
                "token.offset: -4 with length 8 runs past the end",
            ),
            (
                "hash_key = \"token\"\n[listener.token]\nsize = 8\n",
                "udp",
                "unknown field `size`",
            ),
            (
                "source = \"backend\"\n",
                "udp",
                "source: \"backend\": expected balancer or client",
            ),
            ("proxy_protocol = \"v1\"\n", "udp", "proxy_protocol: v1 has no UDP form"),
            ("hash_key = \"quic\"\n", "udp", "expected src_ip, src_ip_port or token"),
        ];
        for (extra, protocol, want) in cases {
            let errs = errors(extra, protocol).expect_err(extra);
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{extra}: want {want:?} in {errs:?}"
            );
        }
    }

    #[test]
    fn locates_from_either_end() {
        assert_eq!(t(-16, 16).locate(100), Some(84..100));
        assert_eq!(t(-16, 16).locate(16), Some(0..16));
        assert_eq!(t(-16, 16).locate(15), None);
        assert_eq!(t(-20, 4).locate(30), Some(10..14));
        assert_eq!(t(0, 8).locate(8), Some(0..8));
        assert_eq!(t(0, 8).locate(7), None);
        assert_eq!(t(4, 8).locate(12), Some(4..12));
        assert_eq!(t(4, 8).locate(11), None);
        assert_eq!(t(0, 1).locate(0), None);
    }
}
