//! `ringlb fleet check ENDPOINT...`: asks each instance how it routes and names the first difference between them.
//!
//! An endpoint is a control socket path or a metrics address (`ip:port`,
//! optionally `http://ip:port/metrics`). Every instance is compared with the
//! first one given; the comparison itself ([`first_difference`]) is pure.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::protocol::Reply;

/// Exit code: every instance agrees.
pub const EXIT_AGREE: i32 = 0;
/// Exit code: some instance differs from the first.
pub const EXIT_DIFFER: i32 = 1;
/// Exit code: an endpoint could not be asked.
pub const EXIT_UNREACHABLE: i32 = 2;

/// How long one endpoint may take to connect, and then to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes read from a metrics endpoint (10,000 backends are ~5 MiB).
const MAX_METRICS: u64 = 64 << 20;

/// One backend as an instance routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    /// Configured weight (the file's or `ctl weight`'s).
    pub weight: u64,
    /// Weight in the table; 0 = takes no new clients.
    pub effective: u64,
    /// active / draining / disabled / down / ejected.
    pub state: String,
}

/// One pool as an instance routes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    /// `fleet::fingerprint::hex` of the pool.
    pub fingerprint: String,
    /// Configured table size.
    pub table_size: u64,
    /// Backends by address.
    pub backends: BTreeMap<String, BackendView>,
}

/// What one instance says about its pools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceView {
    /// Pools by name.
    pub pools: BTreeMap<String, PoolView>,
}

/// Reads a `ctl backends` reply.
pub fn from_backends_reply(reply: &Reply<'_>) -> Result<InstanceView, String> {
    let pools = match reply {
        Reply::Backends(r) => &r.pools,
        Reply::Error(e) => return Err(format!("error reply: {e}")),
        _ => return Err("not a backends reply".into()),
    };
    let mut view = InstanceView::default();
    for p in pools {
        if p.fingerprint.is_empty() {
            return Err(format!("pool \"{}\" has no fingerprint (ringlb too old?)", p.pool));
        }
        let mut pool = PoolView {
            fingerprint: p.fingerprint.clone(),
            table_size: p.configured_table_size as u64,
            backends: BTreeMap::new(),
        };
        for b in &p.backends {
            pool.backends.insert(
                b.addr.to_string(),
                BackendView {
                    weight: u64::from(b.weight),
                    effective: u64::from(b.effective_weight),
                    state: b.state.to_string(),
                },
            );
        }
        view.pools.insert(p.pool.to_string(), pool);
    }
    Ok(view)
}

/// Reads a `/metrics` page (the `ringlb_pool_*` and `ringlb_backend_*` families).
pub fn from_metrics(text: &str) -> Result<InstanceView, String> {
    let mut view = InstanceView::default();
    let mut saw_fingerprint = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (name_labels, ""),
        };
        if !name.starts_with("ringlb_pool_") && !name.starts_with("ringlb_backend_") {
            continue;
        }
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_string())
            })
        };
        let Some(pool_name) = label("pool") else {
            continue;
        };
        let number = value.parse::<f64>().unwrap_or(0.0) as u64;
        let pool = view.pools.entry(pool_name).or_default();
        let backend_name = label("backend");
        let mut backend = backend_name.map(|b| {
            pool.backends.entry(b).or_insert_with(|| BackendView {
                weight: 0,
                effective: 0,
                state: "?".into(),
            })
        });
        if name == "ringlb_pool_fingerprint_info" {
            saw_fingerprint = true;
            pool.fingerprint = label("fingerprint").unwrap_or_default();
            continue;
        }
        if name == "ringlb_pool_table_size" {
            pool.table_size = number;
            continue;
        }
        match name {
            "ringlb_backend_weight" => {
                if let Some(b) = backend.as_mut() {
                    b.weight = number;
                }
            }
            "ringlb_backend_effective_weight" => {
                if let Some(b) = backend.as_mut() {
                    b.effective = number;
                }
            }
            "ringlb_backend_state" if number == 1 => {
                let state = label("state").unwrap_or_default();
                if let Some(b) = backend.as_mut() {
                    b.state = state;
                }
            }
            _ => {}
        }
    }
    if !saw_fingerprint {
        return Err("no ringlb_pool_fingerprint_info in the metrics (ringlb too old, or not ringlb?)".into());
    }
    // Families of pools that were only seen in per-backend lines (retired
    // pools) carry no fingerprint: they do not route anything new.
    view.pools.retain(|_, p| !p.fingerprint.is_empty());
    Ok(view)
}

/// The first way `other` routes differently from `base`, in the order an
/// operator would look: a pool missing, the table size, a backend missing,
/// a backend usable on one and not the other, a configured weight, an
/// effective weight, and last the fingerprint itself (same inputs, other
/// seeds or build). `None` when they agree.
pub fn first_difference(base: &InstanceView, other: &InstanceView) -> Option<String> {
    for name in base.pools.keys() {
        if !other.pools.contains_key(name) {
            return Some(format!("pool \"{name}\" is missing"));
        }
    }
    for name in other.pools.keys() {
        if !base.pools.contains_key(name) {
            return Some(format!("pool \"{name}\" exists only here"));
        }
    }
    for (name, a) in &base.pools {
        let b = &other.pools[name];
        if a.table_size != b.table_size {
            return Some(format!(
                "pool \"{name}\": table_size {} here, {} on the first",
                b.table_size, a.table_size
            ));
        }
        for addr in a.backends.keys() {
            if !b.backends.contains_key(addr) {
                return Some(format!("pool \"{name}\": backend {addr} is missing"));
            }
        }
        for addr in b.backends.keys() {
            if !a.backends.contains_key(addr) {
                return Some(format!("pool \"{name}\": backend {addr} exists only here"));
            }
        }
        for (addr, x) in &a.backends {
            let y = &b.backends[addr];
            if (x.effective > 0) != (y.effective > 0) {
                let (here, first) = (usable(y), usable(x));
                return Some(format!(
                    "pool \"{name}\": backend {addr} is {here} here, {first} on the first"
                ));
            }
        }
        for (addr, x) in &a.backends {
            let y = &b.backends[addr];
            if x.weight != y.weight {
                return Some(format!(
                    "pool \"{name}\": backend {addr} has weight {} here, {} on the first",
                    y.weight, x.weight
                ));
            }
        }
        for (addr, x) in &a.backends {
            let y = &b.backends[addr];
            if x.effective != y.effective {
                return Some(format!(
                    "pool \"{name}\": backend {addr} has effective weight {} here, {} on the first (slow start or spill-over)",
                    y.effective, x.effective
                ));
            }
        }
        if a.fingerprint != b.fingerprint {
            return Some(format!(
                "pool \"{name}\": fingerprint {} here, {} on the first, with the same backends and weights (another ringlb build or fleet seeds?)",
                b.fingerprint, a.fingerprint
            ));
        }
    }
    None
}

fn usable(b: &BackendView) -> String {
    if b.effective > 0 {
        format!("usable ({})", b.state)
    } else {
        format!("not usable ({})", b.state)
    }
}

/// Asks one endpoint.
pub fn fetch(endpoint: &str) -> Result<InstanceView, String> {
    let addr_text = endpoint
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .trim_end_matches('/');
    if let Ok(addr) = addr_text.parse::<SocketAddr>() {
        let text = fetch_metrics(addr).map_err(|e| format!("{endpoint}: {e}"))?;
        return from_metrics(&text).map_err(|e| format!("{endpoint}: {e}"));
    }
    let request = crate::protocol::Request::Backends {
        pool: None,
        limit: None,
        offset: None,
    };
    let (reply, _) = crate::protocol::client::call(Path::new(endpoint), &request)?;
    from_backends_reply(&reply).map_err(|e| format!("{endpoint}: {e}"))
}

/// The body of `GET /metrics` from `addr` (bounded in time and size; a reply
/// other than 200 is an error).
pub fn fetch_metrics(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("cannot connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).ok();
    s.set_write_timeout(Some(TIMEOUT)).ok();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut body = Vec::new();
    s.take(MAX_METRICS)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the reply: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("not an HTTP reply")?;
    if !head.starts_with("HTTP/1.") || head.split(' ').nth(1).is_none_or(|c| c != "200") {
        return Err(format!("reply {:?}", head.lines().next().unwrap_or("")));
    }
    Ok(rest.to_string())
}

/// `fleet check --json`: `{"agree", "instances", "pools", "differences"}`.
#[derive(Serialize)]
struct CheckReport<'a> {
    agree: bool,
    instances: &'a [String],
    pools: Vec<PoolFingerprint<'a>>,
    differences: Vec<Difference<'a>>,
}

/// One pool of the first instance, in [`CheckReport`].
#[derive(Serialize)]
struct PoolFingerprint<'a> {
    pool: &'a str,
    fingerprint: &'a str,
}

/// An instance that differs from the first, in [`CheckReport`].
#[derive(Serialize)]
struct Difference<'a> {
    endpoint: &'a str,
    first_difference: &'a str,
}

/// Runs `fleet check`; returns the exit code.
pub fn run(endpoints: &[String], json_output: bool) -> i32 {
    let mut views = Vec::new();
    for e in endpoints {
        match fetch(e) {
            Ok(v) => views.push(v),
            Err(err) => {
                eprintln!("ringlb fleet check: {err}");
                return EXIT_UNREACHABLE;
            }
        }
    }
    let Some(base) = views.first() else {
        eprintln!("ringlb fleet check: give at least one endpoint");
        return crate::output::EXIT_USAGE;
    };
    let diffs: Vec<(usize, String)> = views
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(i, v)| first_difference(base, v).map(|d| (i, d)))
        .collect();
    let code = if diffs.is_empty() { EXIT_AGREE } else { EXIT_DIFFER };
    let text = if json_output {
        let report = CheckReport {
            agree: diffs.is_empty(),
            instances: endpoints,
            pools: base
                .pools
                .iter()
                .map(|(pool, p)| PoolFingerprint {
                    pool,
                    fingerprint: &p.fingerprint,
                })
                .collect(),
            differences: diffs
                .iter()
                .map(|(i, d)| Difference {
                    endpoint: &endpoints[*i],
                    first_difference: d,
                })
                .collect(),
        };
        format!("{}\n", serde_json::to_string(&report).expect("plain structs serialize"))
    } else {
        let mut out = String::new();
        if diffs.is_empty() {
            out.push_str(&format!("agree: {} instance(s)\n", endpoints.len()));
        } else {
            out.push_str(&format!(
                "DIFFER: {} of {} instance(s) route differently from {}\n",
                diffs.len(),
                endpoints.len(),
                endpoints[0]
            ));
            for (i, d) in &diffs {
                out.push_str(&format!("  {}: {d}\n", endpoints[*i]));
            }
        }
        for (name, p) in &base.pools {
            out.push_str(&format!(
                "  pool {name}: fingerprint {} on {}\n",
                p.fingerprint, endpoints[0]
            ));
        }
        out
    };
    crate::output::print(&text, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(backends: &[(&str, u64, u64, &str)], size: u64, fp: &str) -> InstanceView {
        let mut v = InstanceView::default();
        v.pools.insert(
            "web".into(),
            PoolView {
                fingerprint: fp.into(),
                table_size: size,
                backends: backends
                    .iter()
                    .map(|(a, w, e, s)| {
                        (
                            a.to_string(),
                            BackendView {
                                weight: *w,
                                effective: *e,
                                state: s.to_string(),
                            },
                        )
                    })
                    .collect(),
            },
        );
        v
    }

    #[test]
    fn names_the_first_difference() {
        let a = inst(
            &[("1.1.1.1:1", 1, 1000, "active"), ("1.1.1.2:1", 2, 2000, "active")],
            251,
            "f",
        );
        assert_eq!(first_difference(&a, &a.clone()), None);
        let down = inst(
            &[("1.1.1.1:1", 1, 1000, "active"), ("1.1.1.2:1", 2, 0, "down")],
            251,
            "g",
        );
        let d = first_difference(&a, &down).unwrap();
        assert!(
            d.contains("1.1.1.2:1 is not usable (down) here, usable (active) on the first"),
            "{d}"
        );
        let size = inst(&[("1.1.1.1:1", 1, 1000, "active")], 257, "h");
        assert!(first_difference(&a, &size)
            .unwrap()
            .contains("table_size 257 here, 251"));
        let weight = inst(
            &[("1.1.1.1:1", 1, 1000, "active"), ("1.1.1.2:1", 3, 3000, "active")],
            251,
            "i",
        );
        assert!(first_difference(&a, &weight)
            .unwrap()
            .contains("weight 3 here, 2 on the first"));
        let seeds = inst(
            &[("1.1.1.1:1", 1, 1000, "active"), ("1.1.1.2:1", 2, 2000, "active")],
            251,
            "z",
        );
        assert!(first_difference(&a, &seeds).unwrap().contains("fingerprint z here"));
    }

    #[test]
    fn reads_metrics() {
        let text = "# HELP x\nringlb_pool_fingerprint_info{pool=\"web\",fingerprint=\"00ff\"} 1\n\
            ringlb_pool_table_size{pool=\"web\"} 251\n\
            ringlb_backend_weight{pool=\"web\",backend=\"[::1]:80\"} 2\n\
            ringlb_backend_effective_weight{pool=\"web\",backend=\"[::1]:80\"} 2000\n\
            ringlb_backend_state{pool=\"web\",backend=\"[::1]:80\",state=\"active\"} 1\n\
            ringlb_backend_state{pool=\"web\",backend=\"[::1]:80\",state=\"down\"} 0\n";
        let v = from_metrics(text).unwrap();
        let p = &v.pools["web"];
        assert_eq!((p.fingerprint.as_str(), p.table_size), ("00ff", 251));
        assert_eq!(
            p.backends["[::1]:80"],
            BackendView {
                weight: 2,
                effective: 2000,
                state: "active".into()
            }
        );
        assert!(from_metrics("ringlb_uptime_seconds 3\n").is_err());
    }
}
