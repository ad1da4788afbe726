//! `ringlb ctl top`: the status page's view in a terminal, refreshing in place, from
//! two samples of `ctl stats` and `ctl backends` over the control socket.
//!
//! Rendering is a pure function of two samples and the seconds between them
//! ([`render`]); the loop around it only asks, sleeps and prints.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ctl::{EXIT_ERROR_REPLY, EXIT_OK, EXIT_UNREACHABLE};
use super::status::per_sec;
use crate::protocol::client::call;
use crate::protocol::{Reply, Request};

/// Fastest refresh `--interval` may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Backends shown per pool; the rest are counted on one line (`ctl backends` pages).
pub const MAX_BACKENDS_SHOWN: usize = 200;

/// One sample: the `stats` and `backends` replies.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `ctl stats` reply.
    pub stats: Value,
    /// `ctl backends` reply (at most [`MAX_BACKENDS_SHOWN`] per pool).
    pub backends: Value,
}

fn ask(path: &Path) -> Result<Sample, (i32, String)> {
    let get = |req: Request| -> Result<Value, (i32, String)> {
        let (reply, line) = call(path, &req).map_err(|e| (EXIT_UNREACHABLE, e))?;
        if let Reply::Error(e) = reply {
            return Err((EXIT_ERROR_REPLY, e));
        }
        // The view reads the reply as a tree: the raw line, as sent.
        serde_json::from_str(&line).map_err(|e| (EXIT_UNREACHABLE, format!("bad reply: {e}")))
    };
    Ok(Sample {
        stats: get(Request::Stats {})?,
        backends: get(Request::Backends {
            pool: None,
            limit: Some(MAX_BACKENDS_SHOWN),
            offset: None,
        })?,
    })
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

fn str_of(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
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
        str_of(&cur.stats, "config_generation"),
        str_of(&cur.stats, "snapshot_generation")
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>10} {:>9} {:>10} {:>10} {:>9}  REFUSED/S",
        "LISTENER", "ACTIVE", "ACCEPTED", "ACC/S", "IN/S", "OUT/S", "REFUSED"
    );
    let empty = Vec::new();
    let old_listeners = prev.stats["listeners"].as_array().unwrap_or(&empty);
    for l in cur.stats["listeners"].as_array().unwrap_or(&empty) {
        let name = str_of(l, "name");
        let o = old_listeners.iter().find(|o| str_of(o, "name") == name);
        let rate = |k: &str| o.map_or(0.0, |o| per_sec(u(o, k), u(l, k), secs));
        let refused = l["refused"].as_object();
        let total: u64 = refused.map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        let by_reason: Vec<String> = refused
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let before = o.and_then(|o| o["refused"][k].as_u64()).unwrap_or(0);
                let r = per_sec(before, v.as_u64().unwrap_or(0), secs);
                (r > 0.0).then(|| format!("{k}={}", short(r)))
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>10} {:>9} {:>10} {:>10} {:>9}  {}",
            name,
            u(l, "active"),
            u(l, "accepted"),
            short(rate("accepted")),
            bytes(rate("bytes_in")),
            bytes(rate("bytes_out")),
            total,
            if by_reason.is_empty() {
                "-".to_string()
            } else {
                by_reason.join(" ")
            }
        );
    }
    let old_pools = prev.backends["pools"].as_array().unwrap_or(&empty);
    let pool_stats = cur.stats["pools"].as_array().unwrap_or(&empty);
    for p in cur.backends["pools"].as_array().unwrap_or(&empty) {
        let name = str_of(p, "pool");
        let panic = p["panic"].as_bool() == Some(true);
        let build = pool_stats
            .iter()
            .find(|s| str_of(s, "name") == name)
            .map_or_else(|| "-".to_string(), |s| str_of(s, "table_build_us"));
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "pool {name}: table generation {}, {} slots, last build {build} us{}",
            str_of(p, "table_generation"),
            str_of(p, "table_size"),
            if panic {
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
        let old = old_pools
            .iter()
            .find(|o| str_of(o, "pool") == name)
            .and_then(|o| o["backends"].as_array());
        let backends = p["backends"].as_array().unwrap_or(&empty);
        for b in backends {
            let addr = str_of(b, "addr");
            let o = old.and_then(|old| old.iter().find(|o| str_of(o, "addr") == addr));
            let rate = |k: &str| o.map_or(0.0, |o| per_sec(u(o, k), u(b, k), secs));
            let share = b["table_share"].as_f64().unwrap_or(0.0);
            let check = match &b["last_check"] {
                Value::Null => "-".to_string(),
                c => format!(
                    "{} {:.1}ms",
                    match c["ok"].as_bool() {
                        Some(true) => "ok",
                        Some(false) => "failed",
                        None => "not run",
                    },
                    c["ms"].as_f64().unwrap_or(0.0)
                ),
            };
            let _ = writeln!(
                out,
                "  {:<24} {} {:>6} {} {:>5.1}% {:>7} {:>8} {:>10} {:>10} {:>8}  {:<18} {}",
                addr,
                paint(color, &str_of(b, "state")),
                u(b, "weight"),
                bar(share, 12),
                share * 100.0,
                u(b, "active"),
                short(rate("total")),
                bytes(rate("bytes_in")),
                bytes(rate("bytes_out")),
                u(b, "failures"),
                check,
                str_of(b, "reason")
            );
        }
        let total = u(p, "total_backends") as usize;
        if total > backends.len() {
            let _ = writeln!(
                out,
                "  ... and {} more (ringlb ctl backends {name} --offset {})",
                total - backends.len(),
                backends.len()
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
        Sample {
            stats: json!({"config_generation": 1, "snapshot_generation": 3,
                "listeners": [{"name": "web", "accepted": accepted, "active": 2, "bytes_in": accepted * 100,
                    "bytes_out": 0, "refused": {"no_backend": accepted / 10, "rate_limited": 0}}],
                "pools": [{"name": "web", "table_build_us": 50}]}),
            backends: json!({"ok": true, "pools": [{"pool": "web", "table_generation": 2, "table_size": 7,
                "panic": false, "total_backends": 1, "backends": [{"addr": "127.0.0.1:1", "state": state,
                "weight": 1, "table_share": 0.5, "active": 2, "total": conns, "bytes_in": 0, "bytes_out": 0,
                "failures": 0, "reason": "why", "last_check": {"ok": true, "ms": 0.3}}]}]}),
        }
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
