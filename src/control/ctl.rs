//! `ringlb ctl`: the control-socket client and its human-readable output.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Exit code when the reply is ok.
pub const EXIT_OK: i32 = 0;
/// Exit code when the reply is an error.
pub const EXIT_ERROR_REPLY: i32 = 1;
/// Exit code when the socket can't be reached.
pub const EXIT_UNREACHABLE: i32 = 2;
// Usage errors and unwritable output have their own codes, shared with the other
// subcommands: crate::output::{EXIT_USAGE, EXIT_OUTPUT}.

/// Finds the socket path: given directly, or read from a config file.
pub fn socket_path(socket: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s);
    }
    let Some(config) = config else {
        return Err("give the control socket with -s SOCKET or the config with -c CONFIG".into());
    };
    let cfg = crate::config::Config::load(config).map_err(|e| e.to_string())?;
    cfg.control
        .socket
        .ok_or_else(|| format!("{}: [control] socket is not set", config.display()))
}

/// Sends `request` and returns the reply, or a message for exit code 2.
pub fn call(path: &Path, request: &Value) -> Result<Value, String> {
    let mut stream =
        UnixStream::connect(path).map_err(|e| format!("cannot reach ringlb at {}: {e}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    // A server that refuses the client (too many control clients) writes its error line
    // and closes without reading, so sending can fail with EPIPE while the reason waits
    // in our receive buffer: read it before reporting the send error.
    let sent = stream.write_all(format!("{request}\n").as_bytes());
    if let Err(e) = &sent {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(format!("sending to {}: {e}", path.display()));
        }
    }
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    serde_json::from_str(&line).or_else(|e| {
        sent.map_err(|e| format!("sending to {}: {e}", path.display()))?;
        read.map_err(|e| format!("reading reply from {}: {e}", path.display()))?;
        Err(format!("bad reply from {}: {e}: {line:?}", path.display()))
    })
}

/// Runs one ctl command; returns the process exit code.
pub fn run(path: &Path, request: Value, json_output: bool) -> i32 {
    let reply = match call(path, &request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringlb ctl: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let ok = reply.get("ok").and_then(Value::as_bool) == Some(true);
    let code = if ok { EXIT_OK } else { EXIT_ERROR_REPLY };
    if json_output {
        crate::output::print(&format!("{reply}\n"), code)
    } else if !ok {
        eprintln!(
            "error: {}",
            reply.get("error").and_then(Value::as_str).unwrap_or("unknown error")
        );
        code
    } else {
        let cmd = request.get("cmd").and_then(Value::as_str).unwrap_or("");
        crate::output::print(&human(cmd, &reply), code)
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

/// One `ctl route` candidate: its address, configured weight and share of the table
/// (the table's own weights are scaled and mean nothing next to the configured one).
fn candidate(c: &Value) -> String {
    let share = c["table_share"]
        .as_f64()
        .map_or_else(|| "-".to_string(), |f| format!("{:.1}%", f * 100.0));
    let full = if c["full"].as_bool() == Some(true) {
        ", full: skipped by new connections"
    } else {
        ""
    };
    format!(
        "{} (weight {}, {share} of the table{full})",
        s(c, "addr"),
        s(c, "weight")
    )
}

/// Human-readable rendering of a reply.
pub fn human(cmd: &str, r: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match cmd {
        "status" => {
            let _ = writeln!(
                out,
                "ringlb {}  up {}s  pid {}",
                s(r, "version"),
                s(r, "uptime_seconds"),
                s(r, "pid")
            );
            if let Some(p) = r.get("predecessor").filter(|p| !p.is_null()) {
                // During an upgrade: the process this one took over from.
                let _ = writeln!(
                    out,
                    "previous process {} (ringlb {}, config generation {}): draining, {} open connection(s)",
                    s(p, "pid"),
                    s(p, "version"),
                    s(p, "config_generation"),
                    s(p, "open_connections")
                );
            }
            let _ = writeln!(
                out,
                "config {} (generation {}), snapshot generation {}",
                s(r, "config"),
                s(r, "config_generation"),
                s(r, "snapshot_generation")
            );
            for w in r["workers"].as_array().into_iter().flatten() {
                let cpu = match w.get("cpu") {
                    Some(c) if !c.is_null() => format!(", on cpu {c}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "worker {}: {} ({}), accepted {}{cpu}",
                    s(w, "id"),
                    s(w, "engine"),
                    s(w, "setup"),
                    s(w, "accepted")
                );
            }
            let _ = writeln!(
                out,
                "{:<16} {:<24} {:<5} {:<16} {:>8}",
                "LISTENER", "BIND", "PROTO", "POOL", "ACTIVE"
            );
            for l in r["listeners"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<16} {:<24} {:<5} {:<16} {:>8}",
                    s(l, "name"),
                    s(l, "bind"),
                    s(l, "protocol"),
                    s(l, "pool"),
                    s(l, "active")
                );
            }
        }
        "backends" => {
            for p in r["pools"].as_array().into_iter().flatten() {
                let panic = if p["panic"].as_bool() == Some(true) {
                    "  PANIC"
                } else {
                    ""
                };
                let shown = p["backends"].as_array().map_or(0, Vec::len) as u64;
                let total = p["total_backends"].as_u64().unwrap_or(shown);
                let offset = p["offset"].as_u64().unwrap_or(0);
                let page = if shown < total {
                    format!(
                        ", backends {}-{} of {total}",
                        (offset + 1).min(offset + shown),
                        offset + shown
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "pool {} (table generation {}{page}){panic}",
                    s(p, "pool"),
                    s(p, "table_generation")
                );
                let _ = writeln!(
                    out,
                    "  {:<24} {:>6} {:<9} {:>7} {:>8} {:>12} {:>12} {:>8}  REASON",
                    "BACKEND", "WEIGHT", "STATE", "ACTIVE", "TOTAL", "BYTES_IN", "BYTES_OUT", "FAILURES"
                );
                for b in p["backends"].as_array().into_iter().flatten() {
                    // A check ringlb could not run leaves the state as it was; say so.
                    let not_run = match (&b["last_check"]["ok"], b["last_check"]["detail"].as_str()) {
                        (Value::Null, Some(detail)) => format!("; last check {detail}"),
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        out,
                        "  {:<24} {:>6} {:<9} {:>7} {:>8} {:>12} {:>12} {:>8}  {}{not_run}",
                        s(b, "addr"),
                        s(b, "weight"),
                        s(b, "state"),
                        s(b, "active"),
                        s(b, "total"),
                        s(b, "bytes_in"),
                        s(b, "bytes_out"),
                        s(b, "failures"),
                        s(b, "reason")
                    );
                }
            }
        }
        "route" => {
            let _ = writeln!(out, "client {} on listener {}", s(r, "client"), s(r, "listener"));
            if r["region"].is_string() {
                let _ = writeln!(out, "region  {}", s(r, "region"));
            }
            let _ = writeln!(
                out,
                "table   {} (generation {})",
                s(r, "table"),
                s(r, "table_generation")
            );
            let candidates: Vec<String> = r["candidates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(candidate)
                .collect();
            let _ = writeln!(out, "chosen  {}", candidates.first().map_or("-", String::as_str));
            let next = &candidates[candidates.len().min(1)..];
            let _ = writeln!(
                out,
                "next    {}",
                if next.is_empty() {
                    "-".to_string()
                } else {
                    next.join(", ")
                }
            );
            if r["port_used"] == false {
                let _ = writeln!(
                    out,
                    "note    hash_key is src_ip_port and no port was given: port 0 was hashed"
                );
            }
        }
        "drain" | "disable" | "remove" => {
            let _ = writeln!(out, "ok: {} connection(s) remaining", s(r, "remaining"));
        }
        "reload" => {
            let changes = r["changes"].as_array().cloned().unwrap_or_default();
            let _ = writeln!(
                out,
                "reloaded (config generation {}): {} change(s)",
                s(r, "config_generation"),
                changes.len()
            );
            for c in changes {
                let _ = writeln!(out, "  {}", c.as_str().unwrap_or_default());
            }
        }
        "stats" => {
            let _ = writeln!(
                out,
                "{:<16} {:>10} {:>8} {:>10} {:>14} {:>14}  REFUSED",
                "LISTENER", "ACCEPTED", "ACTIVE", "ACC_ERRORS", "BYTES_IN", "BYTES_OUT"
            );
            for l in r["listeners"].as_array().into_iter().flatten() {
                let refused: Vec<String> = l["refused"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<16} {:>10} {:>8} {:>10} {:>14} {:>14}  {}",
                    s(l, "name"),
                    s(l, "accepted"),
                    s(l, "active"),
                    s(l, "accept_errors"),
                    s(l, "bytes_in"),
                    s(l, "bytes_out"),
                    refused.join(" ")
                );
            }
            for p in r["pools"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "pool {}: table generation {}, last build {} us, panic {}",
                    s(p, "name"),
                    s(p, "table_generation"),
                    s(p, "table_build_us"),
                    s(p, "panic")
                );
            }
        }
        _ => {
            let _ = writeln!(out, "ok");
        }
    }
    out
}
