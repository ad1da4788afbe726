//! IPv4/IPv6 network prefixes (`10.0.0.0/8`, `2001:db8::/32`) with strict parsing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR string or an (address, length) pair was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Nothing to parse.
    #[error("empty")]
    Empty,
    /// The address part does not parse; `family` is the family the text looks like.
    #[error("invalid {family} address")]
    InvalidAddress {
        /// "IPv4", "IPv6" or "IP", guessed from the text so the message points at the right rules.
        family: &'static str,
    },
    /// The part after `/` is not a decimal number.
    #[error("invalid prefix length \"{0}\"")]
    InvalidPrefixLength(String),
    /// The prefix length exceeds the address width.
    #[error("prefix length /{len} too long for {family} (max /{max})")]
    PrefixTooLong {
        /// The length given.
        len: u32,
        /// The address family.
        family: &'static str,
        /// 32 or 128.
        max: u8,
    },
    /// Bits below the prefix length are set, e.g. `10.1.0.0/8`.
    #[error("host bits set (did you mean {network}?)")]
    HostBitsSet {
        /// The network the operator probably meant.
        network: Cidr,
    },
}

/// A network prefix: an address whose bits below `prefix_len` are all zero.
///
/// Host bits are rejected rather than masked: GeoIP exports always contain clean
/// networks, so a set host bit is almost certainly a typo (`10.1.0.0/8` for `10.1.0.0/16`)
/// and silently masking it would move a whole /8 to the wrong region.
///
/// IPv4-mapped IPv6 prefixes (`::ffff:10.0.0.0/104`) are normalized to their IPv4 form
/// (`10.0.0.0/8`) because IPv4-mapped client addresses are looked up as IPv4; IPv4 and
/// IPv6 are otherwise separate address spaces (`::/0` does not contain `10.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

// === impl Cidr ===

impl Cidr {
    /// Builds a prefix, rejecting lengths beyond the address width and set host bits.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, CidrError> {
        let (addr, len) = canonical(addr, len)?;
        let cidr = Cidr { addr, len };
        let network = cidr.masked();
        if network != cidr {
            return Err(CidrError::HostBitsSet { network });
        }
        Ok(cidr)
    }

    /// A host route (/32 or /128) for one address.
    pub fn host(addr: IpAddr) -> Self {
        let addr = addr.to_canonical();
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, len }
    }

    /// The network address (host bits are zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length: 0..=32 for IPv4, 0..=128 for IPv6.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies inside this prefix; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask_v4(self.len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip) & mask_v6(self.len) == u128::from(net),
            _ => false,
        }
    }

    /// First and last address of an IPv4 prefix as integers, `None` for IPv6.
    pub(crate) fn range_v4(&self) -> Option<(u32, u32)> {
        match self.addr {
            IpAddr::V4(a) => {
                let start = u32::from(a);
                Some((start, start | !mask_v4(self.len)))
            }
            IpAddr::V6(_) => None,
        }
    }

    /// First and last address of an IPv6 prefix as integers, `None` for IPv4.
    pub(crate) fn range_v6(&self) -> Option<(u128, u128)> {
        match self.addr {
            IpAddr::V6(a) => {
                let start = u128::from(a);
                Some((start, start | !mask_v6(self.len)))
            }
            IpAddr::V4(_) => None,
        }
    }

    /// The same length with host bits cleared.
    fn masked(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(self.len))),
        };
        Cidr { addr, len: self.len }
    }
}

/// Checks the length against the family and folds IPv4-mapped IPv6 prefixes into IPv4.
fn canonical(addr: IpAddr, len: u8) -> Result<(IpAddr, u8), CidrError> {
    match addr {
        IpAddr::V4(_) if len > 32 => Err(CidrError::PrefixTooLong {
            len: len.into(),
            family: "IPv4",
            max: 32,
        }),
        IpAddr::V6(_) if len > 128 => Err(CidrError::PrefixTooLong {
            len: len.into(),
            family: "IPv6",
            max: 128,
        }),
        IpAddr::V6(a) if len >= 96 => match a.to_ipv4_mapped() {
            Some(v4) => Ok((IpAddr::V4(v4), len - 96)),
            None => Ok((addr, len)),
        },
        _ => Ok((addr, len)),
    }
}

fn mask_v4(len: u8) -> u32 {
    // checked_shl: a shift by the full width (len 0) would overflow.
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `ADDR/LEN` or a bare `ADDR` (a host route).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(CidrError::Empty);
        }
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| CidrError::InvalidAddress {
            family: guess_family(addr_text),
        })?;
        let len = match len_text {
            None => return Ok(Cidr::host(addr)),
            Some(l) => parse_len(l)?,
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(CidrError::PrefixTooLong {
                len,
                family: if addr.is_ipv4() { "IPv4" } else { "IPv6" },
                max: max as u8,
            });
        }
        // len <= 128 here, so the cast is lossless.
        Cidr::new(addr, len as u8)
    }
}

/// Strict decimal: `u32::from_str` would accept "+8"; more than 3 digits cannot be valid.
fn parse_len(text: &str) -> Result<u32, CidrError> {
    let bad = || CidrError::InvalidPrefixLength(text.to_owned());
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

fn guess_family(text: &str) -> &'static str {
    if text.contains(':') {
        "IPv6"
    } else if !text.is_empty() && text.bytes().all(|b| b == b'.' || b.is_ascii_digit()) {
        "IPv4"
    } else {
        "IP"
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn err(s: &str) -> String {
        s.parse::<Cidr>().unwrap_err().to_string()
    }

    #[test]
    fn parses_and_displays() {
        for s in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.0.2.1/32",
            "2001:db8::/32",
            "::/0",
            "2001:db8::1/128",
        ] {
            assert_eq!(c(s).to_string(), s);
        }
        assert_eq!(c("192.0.2.7"), c("192.0.2.7/32"));
        assert_eq!(c("2001:db8::7"), c("2001:db8::7/128"));
    }

    #[test]
    fn v4_mapped_prefixes_become_v4() {
        assert_eq!(c("::ffff:10.0.0.0/104"), c("10.0.0.0/8"));
        assert_eq!(c("::ffff:192.0.2.1"), c("192.0.2.1/32"));
        // Shorter than /96 is a plain IPv6 prefix.
        assert_eq!(c("::ffff:0:0/96"), c("0.0.0.0/0"));
        assert!(c("::fffe:0:0/95").addr().is_ipv6());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(err("10.0.0.300/8"), "invalid IPv4 address");
        assert_eq!(err("2001:db8::g/32"), "invalid IPv6 address");
        assert_eq!(err("eu/8"), "invalid IP address");
        assert_eq!(err("10.0.0.x"), "invalid IP address");
        assert_eq!(err("/8"), "invalid IP address");
        assert_eq!(err("1.2.3"), "invalid IPv4 address");
        assert_eq!(err(""), "empty");
        assert_eq!(err("10.0.0.0/"), "invalid prefix length \"\"");
        assert_eq!(err("10.0.0.0/+8"), "invalid prefix length \"+8\"");
        assert_eq!(err("10.0.0.0/8/9"), "invalid prefix length \"8/9\"");
        assert_eq!(err("10.0.0.0/33"), "prefix length /33 too long for IPv4 (max /32)");
        assert_eq!(err("::/129"), "prefix length /129 too long for IPv6 (max /128)");
        assert_eq!(err("10.1.0.0/8"), "host bits set (did you mean 10.0.0.0/8?)");
        assert_eq!(err("2001:db8::1/32"), "host bits set (did you mean 2001:db8::/32?)");
    }

    #[test]
    fn contains_respects_length_and_family() {
        let net = c("10.0.0.0/8");
        assert!(net.contains("10.255.255.255".parse().unwrap()));
        assert!(!net.contains("11.0.0.0".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c("::/0").contains("10.1.2.3".parse().unwrap()));
        assert!(c("0.0.0.0/0").contains("255.255.255.255".parse().unwrap()));
        assert!(c("2001:db8::/32").contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!c("2001:db8::/32").contains("2001:db9::".parse().unwrap()));
    }

    #[test]
    fn ranges() {
        assert_eq!(c("10.0.0.0/8").range_v4(), Some((0x0a00_0000, 0x0aff_ffff)));
        assert_eq!(c("0.0.0.0/0").range_v4(), Some((0, u32::MAX)));
        assert_eq!(c("::/0").range_v6(), Some((0, u128::MAX)));
        assert_eq!(c("::/0").range_v4(), None);
    }
}
