//! Property checks over arbitrary bytes, shared by the cargo-fuzz targets in `fuzz/` and
//! the stable replay test `tests/fuzz_corpus.rs`.
//!
//! Each `check_*` takes any input and panics only when a property of the code under test
//! is violated; inputs outside a target's domain (e.g. invalid UTF-8 where the real
//! caller requires text) return early. Not part of the supported API.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;

use crate::config::{Config, ProxyProtocol};
use crate::geo::{self, Cidr, RegionId, RegionMap, RegionMapError, RegionNames};
use crate::protocol::{self, Request};
use crate::proxy::proxy_protocol::{header, MAX_HEADER};

/// The file name the config target parses as; it must appear in every error.
pub const CONFIG_PATH: &str = "/fuzz/dir/ringlb-fuzz.toml";
/// The file name the prefix-file target parses as.
pub const PREFIX_PATH: &str = "fuzz/regions.csv";

/// Target `config`: TOML text → validated [`Config`] (`Config::parse`, as `ringlb check`).
///
/// Ok: the invariants validation promises and that `check` prints (summary counts, every
/// listener's pool exists, unique names and binds, in-range values), and parsing is
/// deterministic. Err: a non-empty list where every error names the file.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `[geo] prefixes_file` makes validation read a file named by the input (it could be
    // /dev/zero); that file's parser is its own target, so such inputs are skipped.
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        if table
            .get("geo")
            .and_then(toml::Value::as_table)
            .is_some_and(|g| g.contains_key("prefixes_file"))
        {
            return;
        }
    }
    let path = Path::new(CONFIG_PATH);
    let result = Config::parse(text, path);
    match &result {
        Ok(cfg) => {
            assert_eq!(cfg.source.as_deref(), Some(path));
            let backends: usize = cfg.pools.iter().map(|p| p.backends.len()).sum();
            let summary = cfg.summary();
            assert_eq!(
                summary,
                format!(
                    "{} listener(s), {} pool(s), {} backend(s), {} worker(s)",
                    cfg.listeners.len(),
                    cfg.pools.len(),
                    backends,
                    cfg.runtime.workers
                )
            );
            assert!((1..=1024).contains(&cfg.runtime.workers));
            let mut pool_names = std::collections::HashSet::new();
            for p in &cfg.pools {
                assert!(pool_names.insert(p.name.as_str()), "duplicate pool {:?}", p.name);
                assert!(!p.backends.is_empty(), "pool {:?} has no backends", p.name);
                assert!(
                    crate::maglev::is_prime(p.table_size as u64),
                    "table_size {}",
                    p.table_size
                );
                assert!((0.0..=1.0).contains(&p.panic_threshold), "{}", p.panic_threshold);
                for b in &p.backends {
                    assert_ne!(b.addr.port(), 0);
                    if let Some(r) = b.region {
                        assert!(cfg.geo.names.name(r).is_some(), "backend region {r:?} unnamed");
                    }
                }
            }
            let mut listener_names = std::collections::HashSet::new();
            let mut binds = std::collections::HashSet::new();
            for l in &cfg.listeners {
                assert!(
                    listener_names.insert(l.name.as_str()),
                    "duplicate listener {:?}",
                    l.name
                );
                assert!(binds.insert((l.bind, l.protocol)), "duplicate bind {}", l.bind);
                assert!(
                    pool_names.contains(l.pool.as_str()),
                    "listener pool {:?} missing",
                    l.pool
                );
                assert_ne!(l.bind.port(), 0);
                assert!(!l.connect_timeout.is_zero() && !l.idle_timeout.is_zero());
                assert!(l.backlog >= 1 && l.connect_attempts >= 1);
                assert!(l.connect_attempts <= crate::config::MAX_CONNECT_ATTEMPTS);
            }
            assert!(cfg.geo.names.name(cfg.geo.map.default_region()).is_some());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result with no errors");
            let shown = errors.to_string();
            assert!(shown.lines().count() >= errors.0.len());
            for e in &errors.0 {
                assert_eq!(e.file, path, "error names another file: {e}");
                assert!(e.to_string().starts_with(CONFIG_PATH), "{e}");
                assert!(!e.place.is_empty() && !e.problem.is_empty(), "{e:?}");
            }
        }
    }
    // Same text, same answer (the default worker count depends only on the machine).
    assert!(Config::parse(text, path) == result, "parse is not deterministic");
}

/// Target `prefix_file`: `CIDR,REGION` text → entries (`geo::parse_prefixes`).
///
/// Ok: valid region names, no repeated CIDR, CIDRs print and parse back to themselves,
/// at most one entry per content line, and the entries build a region map. Err: at most
/// `MAX_ERRORS + 1` errors, each `FILE:LINE: reason` with a real line number, in line
/// order, the "N more" entry only last.
pub fn check_prefix_file(data: &[u8]) {
    // The config loader reads the file with read_to_string, so it is always UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    match geo::parse_prefixes(text, PREFIX_PATH) {
        Ok(entries) => {
            let content_lines = text
                .lines()
                .filter(|l| !l.split('#').next().unwrap_or("").trim().is_empty())
                .count();
            assert!(
                entries.len() <= content_lines,
                "{} entries from {content_lines} lines",
                entries.len()
            );
            let mut seen = std::collections::HashSet::new();
            let mut names = RegionNames::new();
            let mut mapped = Vec::new();
            for (cidr, region) in &entries {
                assert!(seen.insert(*cidr), "{cidr} listed twice");
                assert_eq!(geo::validate_region_name(region), Ok(()), "{region:?}");
                let again: Cidr = cidr.to_string().parse().expect("a CIDR prints as a valid CIDR");
                assert_eq!(again, *cidr);
                mapped.push((*cidr, names.intern(region).expect("valid name")));
            }
            let map = RegionMap::new(mapped.clone(), RegionNames::DEFAULT).expect("no conflicts after parsing");
            for (cidr, region) in &mapped {
                // The network address lies in its own prefix, so it maps to that prefix's
                // region unless a longer one covers it too.
                let got = map.lookup(cidr.addr());
                if got != *region {
                    assert!(
                        mapped
                            .iter()
                            .any(|(c, r)| c.prefix_len() > cidr.prefix_len() && c.contains(cidr.addr()) && *r == got),
                        "{cidr}: {got:?}"
                    );
                }
            }
        }
        Err(errors) => {
            assert!(
                !errors.is_empty() && errors.len() <= geo::MAX_ERRORS + 1,
                "{} errors",
                errors.len()
            );
            let mut last = 0;
            for (i, e) in errors.iter().enumerate() {
                assert_eq!(e.file, PREFIX_PATH);
                assert!(e.line >= 1 && e.line <= lines, "line {} of {lines}", e.line);
                assert!(e.line >= last, "errors out of line order");
                last = e.line;
                let shown = e.to_string();
                assert!(shown.starts_with(&format!("{PREFIX_PATH}:{}: ", e.line)), "{shown}");
                let is_more = matches!(e.kind, geo::PrefixErrorKind::More { .. });
                assert_eq!(is_more, i == geo::MAX_ERRORS, "\"more\" entry misplaced: {shown}");
            }
        }
    }
}

/// Target `control_request`: one control-socket line → [`Request`] (`parse_request`, as
/// the socket calls it after a lossy UTF-8 decode).
///
/// Ok: the line is a JSON object whose `cmd` names the variant returned and whose fields
/// are exactly those of the variant, with the same values. Err: a `bad request: ` message
/// (or `empty request` for a blank line) whose reply is one JSON line.
pub fn check_control_request(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    match protocol::parse_request(&line) {
        Ok(req) => {
            let value: serde_json::Value =
                serde_json::from_str(line.trim()).expect("an accepted request is valid JSON");
            let obj = value.as_object().expect("an accepted request is an object");
            let s = |k: &str| obj.get(k).and_then(|v| v.as_str());
            let i = |k: &str| obj.get(k).and_then(|v| v.as_i64());
            let opt_s = |k: &str| match obj.get(k) {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v.as_str().expect("string field")),
            };
            // `force` is optional and false when absent.
            let force = obj.get("force").and_then(|v| v.as_bool()).unwrap_or(false);
            let opt_i = |k: &str| match obj.get(k) {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v.as_i64().expect("integer field")),
            };
            let (cmd, fields): (&str, &[&str]) = match &req {
                Request::Status {} => ("status", &[]),
                Request::Reload {} => ("reload", &[]),
                Request::Stats {} => ("stats", &[]),
                Request::Backends { pool, limit, offset } => {
                    assert_eq!(pool.as_deref(), opt_s("pool"));
                    assert_eq!(limit.map(|n| n as i64), opt_i("limit"));
                    assert_eq!(offset.map(|n| n as i64), opt_i("offset"));
                    ("backends", &["pool", "limit", "offset"])
                }
                Request::Enable { pool, addr } => {
                    assert_eq!(Some(pool.as_str()), s("pool"));
                    assert_eq!(Some(addr.as_str()), s("addr"));
                    ("enable", &["pool", "addr"])
                }
                Request::Drain { pool, addr, force: f }
                | Request::Disable { pool, addr, force: f }
                | Request::Remove { pool, addr, force: f } => {
                    assert_eq!(Some(pool.as_str()), s("pool"));
                    assert_eq!(Some(addr.as_str()), s("addr"));
                    assert_eq!(*f, force);
                    let cmd = match req {
                        Request::Drain { .. } => "drain",
                        Request::Disable { .. } => "disable",
                        _ => "remove",
                    };
                    (cmd, &["pool", "addr", "force"])
                }
                Request::Weight {
                    pool,
                    addr,
                    weight,
                    force: f,
                } => {
                    assert_eq!(Some(pool.as_str()), s("pool"));
                    assert_eq!(Some(addr.as_str()), s("addr"));
                    assert_eq!(Some(*weight), i("weight"));
                    assert_eq!(*f, force);
                    ("weight", &["pool", "addr", "weight", "force"])
                }
                Request::Add {
                    pool,
                    addr,
                    weight,
                    force: f,
                } => {
                    assert_eq!(Some(pool.as_str()), s("pool"));
                    assert_eq!(Some(addr.as_str()), s("addr"));
                    assert_eq!(*weight, opt_i("weight"));
                    assert_eq!(*f, force);
                    ("add", &["pool", "addr", "weight", "force"])
                }
                Request::WhatIf {
                    pool,
                    change,
                    addr,
                    weight,
                } => {
                    assert_eq!(Some(pool.as_str()), s("pool"));
                    assert_eq!(Some(change.as_str()), s("change"));
                    assert_eq!(Some(addr.as_str()), s("addr"));
                    assert_eq!(*weight, opt_i("weight"));
                    ("what_if", &["pool", "change", "addr", "weight"])
                }
                Request::Takeover { protocol, pid } => {
                    assert_eq!(Some(i64::from(*protocol)), i("protocol"));
                    assert_eq!(Some(i64::from(*pid)), i("pid"));
                    ("takeover", &["protocol", "pid"])
                }
                Request::Route {
                    listener,
                    client,
                    token,
                } => {
                    assert_eq!(Some(listener.as_str()), s("listener"));
                    assert_eq!(Some(client.as_str()), s("client"));
                    assert_eq!(token.as_deref(), s("token"));
                    ("route", &["listener", "client", "token"])
                }
            };
            assert_eq!(s("cmd"), Some(cmd), "{req:?}");
            for k in obj.keys() {
                assert!(
                    k == "cmd" || fields.contains(&k.as_str()),
                    "unknown field {k:?} accepted: {req:?}"
                );
            }
        }
        Err(message) => {
            if line.trim().is_empty() {
                assert_eq!(message, "empty request");
            } else {
                assert!(message.starts_with("bad request: "), "{message}");
            }
            let reply = protocol::error_line(&message);
            assert!(!reply.contains('\n'), "reply spans lines: {reply}");
        }
    }
}

/// Reads fixed-width fields from fuzz input, zero-padded past the end.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A socket address: IPv4, IPv6, or IPv4-mapped IPv6, with any port, flow info and scope.
    fn socket_addr(&mut self) -> SocketAddr {
        let kind = self.u8();
        let port = u16::from_be_bytes(self.take());
        match kind % 3 {
            0 => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(self.take::<4>())), port),
            1 => SocketAddr::V6(SocketAddrV6::new(
                Ipv4Addr::from(self.take::<4>()).to_ipv6_mapped(),
                port,
                0,
                0,
            )),
            _ => SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.take::<16>()),
                port,
                u32::from_be_bytes(self.take()),
                u32::from_be_bytes(self.take()),
            )),
        }
    }
}

/// Target `proxy_header`: `proxy_protocol::header(version, client, local)` over arbitrary
/// addresses.
///
/// Off gives no header; otherwise the header fits in `MAX_HEADER` and decodes back to the
/// addresses, as v1 text (`PROXY TCP4|TCP6 src dst sport dport\r\n`, at most 107 bytes as
/// the spec allows) or v2 binary (signature, PROXY command, family, length, addresses);
/// the v2 DGRAM header of a UDP datagram differs from it only in the transport.
pub fn check_proxy_header(data: &[u8]) {
    let mut b = Bytes(data);
    let version = match b.u8() % 3 {
        0 => ProxyProtocol::Off,
        1 => ProxyProtocol::V1,
        _ => ProxyProtocol::V2,
    };
    let client = b.socket_addr();
    let local = b.socket_addr();
    let Some(h) = header(version, client, local) else {
        assert_eq!(version, ProxyProtocol::Off, "no header for {version:?}");
        return;
    };
    assert_ne!(version, ProxyProtocol::Off, "a header with proxy_protocol off");
    let bytes = h.bytes();
    assert!(bytes.len() <= MAX_HEADER, "{} bytes", bytes.len());
    // What the backend should see: IPv4 when both ends are (possibly mapped) IPv4, else
    // both as IPv6.
    let (src, dst) = match (client.ip().to_canonical(), local.ip().to_canonical()) {
        (s @ IpAddr::V4(_), d @ IpAddr::V4(_)) => (s, d),
        (s, d) => (IpAddr::V6(v6_of(s)), IpAddr::V6(v6_of(d))),
    };
    match version {
        ProxyProtocol::V1 => {
            assert!(bytes.len() <= 107, "v1 line of {} bytes", bytes.len());
            let text = std::str::from_utf8(bytes).expect("v1 is ASCII text");
            let line = text.strip_suffix("\r\n").expect("v1 ends with CRLF");
            assert!(line.is_ascii() && !line.contains(['\r', '\n']), "{text:?}");
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 6, "{text:?}");
            assert_eq!(f[0], "PROXY");
            assert_eq!(f[1], if src.is_ipv4() { "TCP4" } else { "TCP6" }, "{text:?}");
            let ip = |s: &str| -> IpAddr {
                // The family token decides how the address is read.
                if f[1] == "TCP4" {
                    IpAddr::V4(s.parse().expect("TCP4 address"))
                } else {
                    IpAddr::V6(s.parse().expect("TCP6 address"))
                }
            };
            assert_eq!(ip(f[2]), src, "{text:?}");
            assert_eq!(ip(f[3]), dst, "{text:?}");
            for (field, want) in [(f[4], client.port()), (f[5], local.port())] {
                assert_eq!(field.parse::<u16>().ok(), Some(want), "{text:?}");
                assert!(field == "0" || !field.starts_with('0'), "leading zero: {text:?}");
            }
        }
        ProxyProtocol::V2 => {
            assert_eq!(&bytes[..12], b"\r\n\r\n\0\r\nQUIT\n");
            assert_eq!(bytes[12], 0x21, "version 2, PROXY");
            let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
            assert_eq!(bytes.len(), 16 + len);
            let (got_src, got_dst, ports) = match bytes[13] {
                0x11 => {
                    assert_eq!(len, 12);
                    let a = |i: usize| IpAddr::from(<[u8; 4]>::try_from(&bytes[i..i + 4]).unwrap());
                    (a(16), a(20), 24)
                }
                0x21 => {
                    assert_eq!(len, 36);
                    let a = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&bytes[i..i + 16]).unwrap());
                    (a(16), a(32), 48)
                }
                other => panic!("family byte {other:#x}"),
            };
            assert_eq!((got_src, got_dst), (src, dst));
            let port = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
            assert_eq!((port(ports), port(ports + 2)), (client.port(), local.port()));
            // The per-datagram header of a UDP listener: the same bytes but
            // the transport nibble, DGRAM (0x12 / 0x22) for STREAM.
            let d = crate::proxy::proxy_protocol::dgram_header(client, local);
            let d = d.bytes();
            assert!(d.len() <= crate::proxy::proxy_protocol::MAX_V2_HEADER);
            assert_eq!(d.len(), bytes.len());
            assert_eq!(d[13], bytes[13] + 1, "DGRAM family byte");
            assert_eq!((&d[..13], &d[14..]), (&bytes[..13], &bytes[14..]));
        }
        ProxyProtocol::Off => unreachable!(),
    }
}

fn v6_of(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Target `region_map`: a [`RegionMap`] built from arbitrary prefixes, looked up with
/// arbitrary addresses, against a naive longest-prefix scan.
///
/// Input: a prefix count, the default region, then per prefix a kind byte, a length byte,
/// a region byte and 4 or 16 address bytes (or a run of up to 96 adjacent prefixes);
/// the rest are probe addresses. Kinds cover
/// IPv4, IPv6, IPv4-mapped IPv6 (folded into IPv4 by [`Cidr::new`]) and "narrow" prefixes
/// under 10.0.0.0/16 and 2001:db8::/32 that nest and collide. Build fails exactly when a
/// prefix repeats with another region; otherwise every probe (each prefix's edges and
/// neighbours, the extra addresses, and their mapped forms) agrees with the scan.
pub fn check_region_map(data: &[u8]) {
    let mut b = Bytes(data);
    let count = usize::from(b.u8() % 128);
    let default = RegionId(u16::from(b.u8() % 8));
    let mut prefixes: Vec<(Cidr, RegionId)> = Vec::new();
    for _ in 0..count {
        // Bounded so the naive scan stays fast.
        if b.is_empty() || prefixes.len() >= 512 {
            break;
        }
        let kind = b.u8();
        let len = b.u8();
        // Few regions, so neighbours often share one and ranges merge.
        let region = RegionId(u16::from(b.u8() % 6));
        if kind % 6 == 5 {
            // A run of adjacent equal-length prefixes with cycling regions: enough ranges
            // for the lookup index (64+), which single prefixes rarely reach.
            let n = 1 + u32::from(b.u8() % 96);
            let cycle = 1 + region.0 % 3;
            if kind & 0x80 == 0 {
                let plen = 16 + len % 17;
                let base = 0x0a00_0000
                    | (u32::from(u16::from_be_bytes(b.take())) & !u32::MAX.checked_shr(u32::from(plen)).unwrap_or(0));
                for j in 0..n {
                    let a = base.wrapping_add(j.checked_shl(32 - u32::from(plen)).unwrap_or(0));
                    let addr = mask(IpAddr::V4(Ipv4Addr::from(a)), plen);
                    prefixes.push((Cidr::new(addr, plen).unwrap(), RegionId(j as u16 % cycle)));
                }
            } else {
                let plen = 32 + len % 97;
                let base = (0x2001_0db8u128 << 96) | (u128::from(u32::from_be_bytes(b.take())) << 64);
                for j in 0..n {
                    let a = base.wrapping_add(u128::from(j).checked_shl(128 - u32::from(plen)).unwrap_or(0));
                    let addr = mask(IpAddr::V6(Ipv6Addr::from(a)), plen);
                    prefixes.push((Cidr::new(addr, plen).unwrap(), RegionId(j as u16 % cycle)));
                }
            }
            continue;
        }
        let (addr, len) = match kind % 5 {
            0 => (IpAddr::V4(Ipv4Addr::from(b.take::<4>())), len % 33),
            1 => {
                let a = u32::from_be_bytes(b.take());
                (IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (a & 0xffff))), 16 + len % 17)
            }
            2 => (IpAddr::V6(Ipv6Addr::from(b.take::<16>())), len % 129),
            3 => {
                let a = u128::from_be_bytes(b.take());
                (
                    IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (a >> 32))),
                    32 + len % 97,
                )
            }
            _ => (
                IpAddr::V6(Ipv4Addr::from(b.take::<4>()).to_ipv6_mapped()),
                96 + len % 33,
            ),
        };
        let network = mask(addr, len);
        let cidr = Cidr::new(network, len).expect("a masked address is a valid prefix");
        if network != addr {
            assert!(Cidr::new(addr, len).is_err(), "host bits accepted: {addr}/{len}");
        }
        prefixes.push((cidr, region));
    }
    let mut extra = Vec::new();
    while !b.is_empty() {
        let kind = b.u8();
        extra.push(match kind % 3 {
            0 => IpAddr::V4(Ipv4Addr::from(b.take::<4>())),
            1 => IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | u32::from(u16::from_be_bytes(b.take())))),
            _ => IpAddr::V6(Ipv6Addr::from(b.take::<16>())),
        });
    }

    // Conflicts, as the oracle sees them: the same prefix with two regions.
    let mut first: std::collections::HashMap<Cidr, (usize, RegionId)> = std::collections::HashMap::new();
    let mut conflict = false;
    for (i, (c, r)) in prefixes.iter().enumerate() {
        let (_, r0) = *first.entry(*c).or_insert((i, *r));
        conflict |= r0 != *r;
    }
    let map = match RegionMap::new(prefixes.clone(), default) {
        Err(RegionMapError::Conflict {
            cidr,
            first_index,
            first_region,
            second_index,
            second_region,
        }) => {
            assert!(conflict, "conflict reported where there is none: {cidr}");
            assert!(first_index < second_index);
            assert_ne!(first_region, second_region);
            assert_eq!(prefixes[first_index], (cidr, first_region));
            assert_eq!(prefixes[second_index], (cidr, second_region));
            return;
        }
        Ok(map) => {
            assert!(!conflict, "conflicting prefixes accepted");
            map
        }
    };
    assert_eq!(map.prefix_count(), prefixes.len());
    assert_eq!(map.default_region(), default);

    let mut probes = extra;
    for (c, _) in &prefixes {
        match c.addr() {
            IpAddr::V4(a) => {
                let s = u32::from(a);
                let e = s | (u32::MAX.checked_shr(u32::from(c.prefix_len())).unwrap_or(0));
                for x in [s.wrapping_sub(1), s, e, e.wrapping_add(1)] {
                    probes.push(IpAddr::V4(Ipv4Addr::from(x)));
                }
            }
            IpAddr::V6(a) => {
                let s = u128::from(a);
                let e = s | (u128::MAX.checked_shr(u32::from(c.prefix_len())).unwrap_or(0));
                for x in [s.wrapping_sub(1), s, e, e.wrapping_add(1)] {
                    probes.push(IpAddr::V6(Ipv6Addr::from(x)));
                }
            }
        }
    }
    for ip in probes {
        let want = naive_lookup(&prefixes, default, ip);
        assert_eq!(map.lookup(ip), want, "lookup {ip}");
        if let IpAddr::V4(a) = ip {
            assert_eq!(map.lookup(IpAddr::V6(a.to_ipv6_mapped())), want, "lookup mapped {ip}");
        }
    }
}

/// `addr` with the bits below `len` cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
            u32::from(a) & !u32::MAX.checked_shr(u32::from(len)).unwrap_or(0),
        )),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
            u128::from(a) & !u128::MAX.checked_shr(u32::from(len)).unwrap_or(0),
        )),
    }
}

/// Longest-prefix match by scanning every prefix; IPv4-mapped addresses are IPv4.
fn naive_lookup(prefixes: &[(Cidr, RegionId)], default: RegionId, ip: IpAddr) -> RegionId {
    let ip = ip.to_canonical();
    prefixes
        .iter()
        .filter(|(c, _)| match (c.addr(), ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => mask(ip, c.prefix_len()) == c.addr(),
            _ => false,
        })
        .max_by_key(|(c, _)| c.prefix_len())
        .map_or(default, |&(_, r)| r)
}

/// Target `proxy_accept`: [`crate::proxy::proxy_accept::parse`] over arbitrary bytes
/// (the first byte picks the accepted versions).
///
/// Never panics; a complete header is at most `MAX_HEADER` bytes and within the input,
/// the verdict does not change with bytes after it, and every shorter prefix of it is
/// "incomplete" (so a header split over reads is never refused early). An input that
/// is incomplete is shorter than the bound; a refusal stays a refusal with more bytes.
pub fn check_proxy_accept(data: &[u8]) {
    use crate::proxy::proxy_accept::{parse, Accept, MAX_HEADER as MAX_IN};
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let accept = match first % 3 {
        0 => Accept::V1,
        1 => Accept::V2,
        _ => Accept::Any,
    };
    let verdict = parse(input, accept);
    let mut longer = input.to_vec();
    longer.extend_from_slice(b"\r\n\0PROXY \x16\x03");
    match verdict {
        Ok(Some(p)) => {
            assert!(p.len <= input.len() && p.len <= MAX_IN, "{p:?} of {}", input.len());
            assert!(
                p.len >= 15,
                "shortest header is 15 bytes (v1 UNKNOWN) or 16 (v2): {p:?}"
            );
            assert_eq!(
                parse(&input[..p.len], accept),
                verdict,
                "depends on bytes after the header"
            );
            assert_eq!(parse(&longer, accept), verdict);
            for cut in [0, 1, p.len / 2, p.len - 1] {
                assert_eq!(parse(&input[..cut], accept), Ok(None), "prefix of {cut} bytes refused");
            }
            if let Some((src, dst)) = p.addrs {
                assert_eq!(src.is_ipv4(), dst.is_ipv4(), "one family per header");
            }
        }
        Ok(None) => assert!(input.len() < MAX_IN, "undecided after {} bytes", input.len()),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(parse(&longer, accept), verdict, "a refusal changed with more bytes");
        }
    }
}

/// Target `client_hello`: [`crate::proxy::client_hello::server_name`] over arbitrary bytes.
///
/// Never panics; a name is a sub-slice of the first record, a valid host name (letters,
/// digits, `-`, `_`, dots between non-empty labels, at most 255 bytes); a decided
/// verdict does not change with bytes after it; "incomplete" only below the size bound.
pub fn check_client_hello(data: &[u8]) {
    use crate::proxy::client_hello::{server_name, Hello, MAX_HELLO};
    let verdict = server_name(data);
    match verdict {
        Hello::Incomplete => assert!(data.len() < MAX_HELLO, "undecided after {} bytes", data.len()),
        Hello::Sni(name) => {
            assert!(!name.is_empty() && name.len() <= 255);
            let start = name.as_ptr() as usize - data.as_ptr() as usize;
            assert!(
                start + name.len() <= data.len().min(MAX_HELLO),
                "name outside the record"
            );
            assert!(
                name.iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
                "{name:?}"
            );
            assert!(
                !name.split(|&b| b == b'.').any(|l| l.is_empty()),
                "empty label: {name:?}"
            );
        }
        Hello::NotTls | Hello::NoSni => {}
    }
    if verdict != Hello::Incomplete {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0x16, 3, 1, 0, 5, 1, 0, 0, 1]);
        assert_eq!(server_name(&longer), verdict, "verdict changed with bytes after it");
    }
}

/// Target `probe`: the protocol health checks ([`crate::health::probe::Exchange`]) over
/// arbitrary server replies. The first byte picks the check (http with a body match,
/// http by status, postgres, mysql, redis PING, redis ROLE master); the rest, split at
/// the first `0xfe 0xfe` into two replies, is what the server sends (the second reply
/// is used after a [`Step::Send`](crate::health::probe::Step)).
///
/// Never panics; at the end of a reply (`ended`) a check always decides; a decision
/// taken on a prefix is the one taken on the whole reply (bytes after a verdict never
/// change it); a reason is non-empty and bounded (it goes into logs and `ctl`); an
/// opening and anything sent fit one reply buffer.
pub fn check_probe(data: &[u8]) {
    use crate::config::*;
    use crate::health::probe::{Step, MAX_REPLY};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let kind = match pick % 6 {
        0 => CheckKind::Http(HttpCheck {
            method: "GET".into(),
            path: "/primary".into(),
            host: None,
            expect_status: StatusMatch::Class(2),
            expect_body: Some(b"\"role\": \"master\"".to_vec()),
        }),
        1 => CheckKind::Http(HttpCheck {
            method: "OPTIONS".into(),
            path: "/replica".into(),
            host: Some("db".into()),
            expect_status: StatusMatch::Codes(vec![200, 204]),
            expect_body: None,
        }),
        2 => CheckKind::Postgres(PostgresCheck {
            user: "app".into(),
            database: Some("app".into()),
        }),
        3 => CheckKind::Mysql(MysqlCheck {
            user: if pick & 0x80 != 0 { Some("app".into()) } else { None },
        }),
        4 => CheckKind::Redis(RedisCheck {
            role: None,
            noauth_is_up: pick & 0x80 != 0,
        }),
        _ => CheckKind::Redis(RedisCheck {
            role: Some(if pick & 0x80 != 0 {
                RedisRole::Replica
            } else {
                RedisRole::Master
            }),
            noauth_is_up: false,
        }),
    };
    let target: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let replies: Vec<&[u8]> = match rest.windows(2).position(|w| w == [0xfe, 0xfe]) {
        Some(i) => vec![&rest[..i], &rest[i + 2..]],
        None => vec![rest],
    };
    let fresh = crate::control::health_check::exchange_for(&kind, target).expect("a protocol check");
    assert!(fresh.opening().len() <= MAX_REPLY);
    let check_reason = |reason: &str| {
        assert!(!reason.is_empty(), "empty reason");
        assert!(reason.len() <= 2048, "reason of {} bytes", reason.len());
    };
    // Walk the replies as the shell does, deciding on whole replies, and compare every
    // prefix of each with the whole.
    let mut x = fresh;
    for reply in replies {
        let reply = &reply[..reply.len().min(MAX_REPLY)];
        let whole = x.clone().step(reply, false);
        let ended = x.clone().step(reply, true);
        assert_ne!(ended, Step::Read, "undecided at the end of the reply");
        if let Step::Done { verdict, .. } = &ended {
            check_reason(&verdict.reason);
        }
        for cut in [0, 1, 3, 4, 5, 7, reply.len() / 2, reply.len().saturating_sub(1)] {
            let cut = cut.min(reply.len());
            let early = x.clone().step(&reply[..cut], false);
            if early != Step::Read {
                assert_eq!(
                    early,
                    whole,
                    "decided on {cut} bytes, then differently on {}",
                    reply.len()
                );
            }
        }
        match whole {
            Step::Send(bytes) => {
                assert!(!bytes.is_empty() && bytes.len() <= MAX_REPLY);
                x.step(reply, false);
            }
            Step::Done { verdict, .. } => {
                check_reason(&verdict.reason);
                return;
            }
            Step::Read => return,
        }
    }
}
