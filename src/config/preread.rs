//! A TCP listener's pre-read settings: accepting PROXY headers and routing by TLS SNI.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::geo::cidr::Cidr;
use crate::proxy::proxy_accept::Accept;

use super::file::ListenerFile;
use super::validate::Checker;
use super::Protocol;

/// Most `[[listener.route]]` entries on one listener (routes are matched
/// by a scan, and a longer list is a sign of a generated mistake).
pub const MAX_ROUTES: usize = 1024;
/// Most `trusted_sources` entries on one listener.
pub const MAX_TRUSTED: usize = 1024;

/// `[[listener.route]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// `"db1.example.com"` or `"*.example.com"`.
    pub sni: Option<String>,
    /// The pool these clients go to.
    pub pool: Option<String>,
}

/// `accept_proxy` on: clients come through balancers that send a PROXY header.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptProxyConfig {
    /// Versions accepted.
    pub accept: Accept,
    /// Only connections from these addresses may send a header (and must).
    pub trusted: Vec<Cidr>,
    /// The whole header must arrive within this time of the accept.
    pub timeout: Duration,
}

impl AcceptProxyConfig {
    /// Whether `ip` (the socket's peer) is a trusted sender of headers.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

/// A server name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniPattern {
    /// The whole name, lower case.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (one label or more
    /// before it), kept as the suffix `.example.com`, lower case.
    Suffix(String),
}

/// One `[[listener.route]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// What the ClientHello's server name must match.
    pub pattern: SniPattern,
    /// Pool name.
    pub pool: String,
}

/// What happens to a connection that is not TLS, has no SNI, or matches no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniFallback {
    /// It goes to the listener's own `pool`.
    Default,
    /// It is refused (`sni_unmatched`).
    Refuse,
}

/// Routing by TLS server name (a listener with `[[listener.route]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SniConfig {
    /// Routes, in file order.
    pub routes: Vec<SniRoute>,
    /// The ClientHello must arrive within this time (after any PROXY header).
    pub timeout: Duration,
    /// Not TLS, no SNI, or no match.
    pub fallback: SniFallback,
}

impl SniConfig {
    /// The route for server name `name`: an exact match first, else the
    /// longest matching wildcard. Case-insensitive; no allocation.
    pub fn route(&self, name: &[u8]) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, r) in self.routes.iter().enumerate() {
            match &r.pattern {
                SniPattern::Exact(p) if p.as_bytes().eq_ignore_ascii_case(name) => return Some(i),
                SniPattern::Suffix(s)
                    if name.len() > s.len()
                        && name[name.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
                        && best.is_none_or(|(_, l)| s.len() > l) =>
                {
                    best = Some((i, s.len()));
                }
                _ => {}
            }
        }
        best.map(|(i, _)| i)
    }
}

/// Validates a listener's `accept_proxy`, `trusted_sources`,
/// `proxy_header_timeout`, `[[listener.route]]`, `sni_timeout` and `sni_fallback`.
pub(super) fn validate(
    c: &mut Checker<'_>,
    place: &str,
    l: &ListenerFile,
    protocol: Protocol,
) -> (Option<AcceptProxyConfig>, Option<SniConfig>) {
    let accept = match l.accept_proxy.as_deref() {
        None | Some("off") => None,
        Some("v1") => Some(Accept::V1),
        Some("v2") => Some(Accept::V2),
        Some("any") => Some(Accept::Any),
        Some(other) => {
            c.err(
                &format!("{place}accept_proxy"),
                format!("\"{other}\": expected off, v1, v2 or any"),
            );
            None
        }
    };
    let tcp_only = |c: &mut Checker<'_>, key: &str, set: bool| {
        if set && protocol == Protocol::Udp {
            c.err(&format!("{place}{key}"), "only applies to protocol = \"tcp\"");
        }
    };
    tcp_only(c, "accept_proxy", accept.is_some());
    tcp_only(c, "route", l.route.is_some());
    let mut trusted = Vec::new();
    for (i, s) in l.trusted_sources.iter().flatten().enumerate() {
        match s.parse::<Cidr>() {
            Ok(cidr) => trusted.push(cidr),
            Err(e) => c.err(&format!("{place}trusted_sources[{}]", i + 1), format!("\"{s}\": {e}")),
        }
    }
    if trusted.len() > MAX_TRUSTED {
        c.err(
            &format!("{place}trusted_sources"),
            format!("more than {MAX_TRUSTED} entries"),
        );
    }
    let timeout = c.duration(
        place,
        "proxy_header_timeout",
        &l.proxy_header_timeout,
        Duration::from_secs(3),
    );
    if timeout.is_zero() {
        c.err(&format!("{place}proxy_header_timeout"), "must be more than 0");
    }
    let proxy = match accept {
        Some(accept) => {
            if l.trusted_sources.as_ref().is_none_or(|t| t.is_empty()) {
                c.err(
                    &format!("{place}trusted_sources"),
                    "required with accept_proxy: the addresses of the balancers allowed to send PROXY headers",
                );
            }
            Some(AcceptProxyConfig {
                accept,
                trusted,
                timeout,
            })
        }
        None => {
            for (key, set) in [
                ("trusted_sources", l.trusted_sources.is_some()),
                ("proxy_header_timeout", l.proxy_header_timeout.is_some()),
            ] {
                if set {
                    c.err(
                        &format!("{place}{key}"),
                        "only applies with accept_proxy = v1, v2 or any",
                    );
                }
            }
            None
        }
    };

    let sni_timeout = c.duration(place, "sni_timeout", &l.sni_timeout, Duration::from_secs(3));
    if sni_timeout.is_zero() {
        c.err(&format!("{place}sni_timeout"), "must be more than 0");
    }
    let fallback = match l.sni_fallback.as_deref() {
        None | Some("default") => SniFallback::Default,
        Some("refuse") => SniFallback::Refuse,
        Some(other) => {
            c.err(
                &format!("{place}sni_fallback"),
                format!("\"{other}\": expected default or refuse"),
            );
            SniFallback::Default
        }
    };
    let Some(files) = l.route.as_ref().filter(|r| !r.is_empty()) else {
        for (key, set) in [
            ("sni_timeout", l.sni_timeout.is_some()),
            ("sni_fallback", l.sni_fallback.is_some()),
        ] {
            if set {
                c.err(&format!("{place}{key}"), "only applies with [[listener.route]] entries");
            }
        }
        return (proxy, None);
    };
    if files.len() > MAX_ROUTES {
        c.err(&format!("{place}route"), format!("more than {MAX_ROUTES} entries"));
    }
    let mut routes: Vec<SniRoute> = Vec::new();
    for (i, r) in files.iter().enumerate() {
        let rplace = format!("{place}route {}: ", i + 1);
        let pattern = match r.sni.as_deref() {
            None => {
                c.err(
                    &format!("{rplace}sni"),
                    "missing (expected \"host.example.com\" or \"*.example.com\")",
                );
                None
            }
            Some(s) => match sni_pattern(s) {
                Ok(p) => Some(p),
                Err(e) => {
                    c.err(&format!("{rplace}sni"), format!("\"{s}\": {e}"));
                    None
                }
            },
        };
        let pool = match &r.pool {
            Some(p) if !p.is_empty() => Some(p.clone()),
            _ => {
                c.err(&format!("{rplace}pool"), "missing");
                None
            }
        };
        if let (Some(pattern), Some(pool)) = (pattern, pool) {
            if let Some(j) = routes.iter().position(|o| o.pattern == pattern) {
                c.err(&format!("{rplace}sni"), format!("the same name as route {}", j + 1));
            }
            routes.push(SniRoute { pattern, pool });
        }
    }
    (
        proxy,
        Some(SniConfig {
            routes,
            timeout: sni_timeout,
            fallback,
        }),
    )
}

/// `host.example.com` or `*.example.com`, lower-cased.
fn sni_pattern(s: &str) -> Result<SniPattern, String> {
    let lower = s.to_ascii_lowercase();
    let (name, wildcard) = match lower.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (lower.as_str(), false),
    };
    if name.is_empty() || name.len() > 253 {
        return Err("a server name is 1 to 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("empty or over-long label (a label is 1 to 63 characters)".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("expected letters, digits, - or _ between dots (a wildcard only as a leading \"*.\")".into());
        }
    }
    Ok(if wildcard {
        SniPattern::Suffix(format!(".{name}"))
    } else {
        SniPattern::Exact(name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(routes: &[&str]) -> SniConfig {
        SniConfig {
            routes: routes
                .iter()
                .map(|r| SniRoute {
                    pattern: sni_pattern(r).unwrap(),
                    pool: r.to_string(),
                })
                .collect(),
            timeout: Duration::from_secs(1),
            fallback: SniFallback::Default,
        }
    }

    #[test]
    fn exact_beats_wildcard_and_the_longest_wildcard_wins() {
        let c = cfg(&["*.example.com", "db1.example.com", "*.eu.example.com"]);
        assert_eq!(c.route(b"db1.example.com"), Some(1));
        assert_eq!(c.route(b"DB1.Example.COM"), Some(1));
        assert_eq!(c.route(b"www.example.com"), Some(0));
        assert_eq!(c.route(b"a.b.example.com"), Some(0));
        assert_eq!(c.route(b"x.eu.example.com"), Some(2));
        assert_eq!(c.route(b"example.com"), None, "a wildcard needs a label before it");
        assert_eq!(c.route(b"badexample.com"), None);
        assert_eq!(c.route(b""), None);
    }

    #[test]
    fn patterns_are_checked() {
        assert!(sni_pattern("*.example.com").is_ok());
        assert!(sni_pattern("host").is_ok());
        for bad in ["", "*.", "a..b", "a*.b", "*", "a.*.b", "sp ace.com", "**.a"] {
            assert!(sni_pattern(bad).is_err(), "{bad}");
        }
    }
}
