//! `ringlb ctl top`: the status page's view in a terminal, refreshing in place, from
//! two samples of `ctl stats` and `ctl backends` over the control socket.
//!
//! Rendering is a pure function of two samples and the seconds between them
//! ([`render`]); the loop around it only asks, sleeps and prints.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use super::ctl::{EXIT_ERROR_REPLY, EXIT_OK, EXIT_UNREACHABLE};
use super::status::per_sec;
use crate::protocol::client::call;
use crate::protocol::{BackendsReply, LastCheck, Reply, Request, StatsReply};

/// Fastest refresh `--interval` may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Backends shown per pool; the rest are counted on one line (`ctl backends` pages).
pub const MAX_BACKENDS_SHOWN: usize = 200;

/// One sample: the `stats` and `backends` replies.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `ctl stats` reply.
    pub stats: StatsReply,
    /// `ctl backends` reply (at most [`MAX_BACKENDS_SHOWN`] per pool).
    pub backends: BackendsReply<'static>,
}

fn ask(path: &Path) -> Result<Sample, (i32, String)> {
    let get = |req: Request| -> Result<Reply<'static>, (i32, String)> {
        match call(path, &req).map_err(|e| (EXIT_UNREACHABLE, e))? {
            (Reply::Error(e), _) => Err((EXIT_ERROR_REPLY, e)),
            (reply, _) => Ok(reply),
        }
    };
    let stats = match get(Request::Stats {})? {
        Reply::Stats(r) => r,
        other => return Err((EXIT_UNREACHABLE, format!("bad reply to stats: {other:?}"))),
    };
    let backends = match get(Request::Backends {
        pool: None,
        limit: Some(MAX_BACKENDS_SHOWN),
        offset: None,
    })? {
        Reply::Backends(r) => r,
        other => return Err((EXIT_UNREACHABLE, format!("bad reply to backends: {other:?}"))),
    };
    Ok(Sample { stats, backends })
}

/// Runs `ctl top`: every `interval` a new frame (in place on a terminal, one after
/// another otherwise) until interrupted; with `once`, one frame after one interval.
pub fn run(path: &Path, once: bool, interval: Duration) -> i32 {
    let interval = interval.max(MIN_INTERVAL);
    // SAFETY: isatty only inspects descriptor 1, which this process owns.
    let tty = unsafe { libc::isatty(1) } == 1;
    let mut prev = match ask(path) {
        Ok(s) => (Instant::now(), s),
        Err((code, e)) => {
            eprintln!("ringlb ctl top: {e}");
            return code;
        }
    };
    loop {
        std::thread::sleep(interval);
        let cur = match ask(path) {
            Ok(s) => (Instant::now(), s),
            Err((code, e)) => {
                eprintln!("ringlb ctl top: {e}");
                return code;
            }
        };
        let secs = cur.0.saturating_duration_since(prev.0).as_secs_f64();
        let frame = render(&prev.1, &cur.1, secs, tty && !once);
        let text = if tty && !once {
            // Home, draw, clear what the last frame left below.
            format!("\x1b[H{}\x1b[J", frame.replace('\n', "\x1b[K\n"))
        } else if once {
            frame
        } else {
            format!("{frame}\n")
        };
        let code = crate::output::print(&text, EXIT_OK);
        if once || code != EXIT_OK {
            return code;
        }
        prev = cur;
    }
}

/// Short form of a count: 1234 -> 1234, 12345 -> 12.3k, 1.2M, 3.4G.
fn short(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.1}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else if n.fract() == 0.0 {
        format!("{n}")
    } else {
        format!("{n:.1}")
    }
}

/// Bytes per second in binary units.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut n, mut i) = (n, 0);
    while n >= 1024.0 && i < UNITS.len() - 1 {
        n /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n:.0}{}", UNITS[i])
    } else {
        format!("{n:.1}{}", UNITS[i])
    }
}

fn paint(color: bool, state: &str) -> String {
    let code = match state {
        "active" => "32",
        "down" | "ejected" => "1;31",
        _ => "33",
    };
    if color {
        format!("\x1b[{code}m{state:<9}\x1b[0m")
    } else {
        format!("{state:<9}")
    }
}

/// A share bar of `width` cells.
fn bar(share: f64, width: usize) -> String {
    let filled = ((share.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "#".repeat(filled), ".".repeat(width - filled))
}

/// One frame from two samples `secs` apart: listeners (totals and rates, refusals by
/// reason), then per pool its backends with state, share of the table, connections and
/// rates. `color` adds ANSI colours (terminals only).
pub fn render(prev: &Sample, cur: &Sample, secs: f64, color: bool) -> String {
    let secs = secs.max(1e-3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ringlb top: config generation {}, snapshot {}, rates over {secs:.1}s",
        cur.stats.config_generation, cur.stats.snapshot_generation
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>10} {:>9} {:>10} {:>10} {:>9}  REFUSED/S",
        "LISTENER", "ACTIVE", "ACCEPTED", "ACC/S", "IN/S", "OUT/S", "REFUSED"
    );
    for l in &cur.stats.listeners {
        let o = prev.stats.listeners.iter().find(|o| o.name == l.name);
        let rate = |now: u64, before: fn(&crate::protocol::ListenerCounters) -> u64| {
            o.map_or(0.0, |o| per_sec(before(o), now, secs))
        };
        let total: u64 = l.refused.values().sum();
        let by_reason: Vec<String> = l
            .refused
            .iter()
            .filter_map(|(k, &v)| {
                let before = o.and_then(|o| o.refused.get(k).copied()).unwrap_or(0);
                let r = per_sec(before, v, secs);
                (r > 0.0).then(|| format!("{k}={}", short(r)))
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>10} {:>9} {:>10} {:>10} {:>9}  {}",
            l.name,
            l.active,
            l.accepted,
            short(rate(l.accepted, |o| o.accepted)),
            bytes(rate(l.bytes_in, |o| o.bytes_in)),
            bytes(rate(l.bytes_out, |o| o.bytes_out)),
            total,
            if by_reason.is_empty() {
                "-".to_string()
            } else {
                by_reason.join(" ")
            }
        );
    }
    for p in &cur.backends.pools {
        let build = cur
            .stats
            .pools
            .iter()
            .find(|s| s.name == p.pool)
            .map_or_else(|| "-".to_string(), |s| s.table_build_us.to_string());
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "pool {}: table generation {}, {} slots, last build {build} us{}",
            p.pool,
            p.table_generation,
            p.table_size,
            if p.panic {
                if color {
                    "  \x1b[1;31mPANIC\x1b[0m"
                } else {
                    "  PANIC"
                }
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  {:<24} {:<9} {:>6} {:<19} {:>7} {:>8} {:>10} {:>10} {:>8}  {:<18} REASON",
            "BACKEND", "STATE", "WEIGHT", "SHARE", "ACTIVE", "CONN/S", "IN/S", "OUT/S", "FAILURES", "LAST CHECK"
        );
        let old = prev.backends.pools.iter().find(|o| o.pool == p.pool);
        for b in &p.backends {
            let o = old.and_then(|old| old.backends.iter().find(|o| o.addr == b.addr));
            let rate = |now: u64, before: fn(&crate::protocol::BackendRow<'_>) -> u64| {
                o.map_or(0.0, |o| per_sec(before(o), now, secs))
            };
            let check = match &b.last_check {
                None => "-".to_string(),
                Some(LastCheck { ok, ms, .. }) => format!(
                    "{} {ms:.1}ms",
                    match ok {
                        Some(true) => "ok",
                        Some(false) => "failed",
                        None => "not run",
                    }
                ),
            };
            let _ = writeln!(
                out,
                "  {:<24} {} {:>6} {} {:>5.1}% {:>7} {:>8} {:>10} {:>10} {:>8}  {:<18} {}",
                b.addr.to_string(),
                paint(color, &b.state),
                b.weight,
                bar(b.table_share, 12),
                b.table_share * 100.0,
                b.active,
                short(rate(b.total, |o| o.total)),
                bytes(rate(b.bytes_in, |o| o.bytes_in)),
                bytes(rate(b.bytes_out, |o| o.bytes_out)),
                b.failures,
                check,
                b.reason
            );
        }
        if p.total_backends > p.backends.len() {
            let _ = writeln!(
                out,
                "  ... and {} more (ringlb ctl backends {} --offset {})",
                p.total_backends - p.backends.len(),
                p.pool,
                p.backends.len()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(accepted: u64, conns: u64, state: &str) -> Sample {
        // Built as the server's JSON lines and read like `ctl` reads them.
        let stats = json!({"ok": true, "config_generation": 1, "snapshot_generation": 3,
            "listeners": [{"name": "web", "accepted": accepted, "relayed": accepted, "active": 2,
                "bytes_in": accepted * 100, "bytes_out": 0, "accept_errors": 0, "datagrams_in": 0,
                "datagrams_out": 0, "datagrams_dropped": 0, "sources": null,
                "refused": {"no_backend": accepted / 10, "rate_limited": 0}}],
            "pools": [{"name": "web", "table_generation": 2, "table_build_us": 50, "panic": false}]});
        let backends = json!({"ok": true, "pools": [{"pool": "web", "table_generation": 2, "table_size": 7,
            "panic": false, "total_backends": 1, "offset": 0, "backends": [{"addr": "127.0.0.1:1",
            "state": state, "weight": 1, "effective_weight": 1, "table_share": 0.5, "active": 2,
            "total": conns, "bytes_in": 0, "bytes_out": 0, "failures": 0, "ejections": 0,
            "removing": false, "reason": "why", "last_check": {"ok": true, "ms": 0.3, "detail": ""}}]}]});
        let parse = |req: &Request, v: serde_json::Value| Reply::parse(req, &v.to_string()).unwrap();
        let Reply::Stats(stats) = parse(&Request::Stats {}, stats) else {
            panic!("not a stats reply")
        };
        let backends_request = Request::Backends {
            pool: None,
            limit: None,
            offset: None,
        };
        let Reply::Backends(backends) = parse(&backends_request, backends) else {
            panic!("not a backends reply")
        };
        Sample { stats, backends }
    }

    #[test]
    fn a_frame_has_totals_rates_and_shares() {
        let f = render(&sample(100, 50, "active"), &sample(300, 250, "down"), 2.0, false);
        let web = f.lines().find(|l| l.starts_with("web ")).unwrap();
        let cols: Vec<&str> = web.split_whitespace().collect();
        assert_eq!(&cols[..7], ["web", "2", "300", "100", "9.8KiB", "0B", "30"], "{f}");
        assert!(web.ends_with("no_backend=10"), "{f}");
        let b = f.lines().find(|l| l.trim_start().starts_with("127.0.0.1:1")).unwrap();
        assert!(
            b.contains("down ") && b.contains("######...... ") && b.contains("50.0%"),
            "{f}"
        );
        assert!(
            b.contains(" 100 ") && b.contains("ok 0.3ms") && b.ends_with("why"),
            "{f}"
        );
        assert!(!f.contains('\x1b'), "plain text has no escapes: {f}");
        assert!(render(&sample(1, 1, "down"), &sample(1, 1, "down"), 1.0, true).contains("\x1b[1;31m"));
    }
}
