//! `ringlb ctl`: the control-socket client and its human-readable output.

use std::path::{Path, PathBuf};

use crate::protocol::client::call;
use crate::protocol::{Candidate, OldNew, PoolMoves, Reply, Request};

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

/// Runs one ctl command; returns the process exit code. `--json` prints
/// the reply line as the server sent it (fields this `ctl` does not know
/// included); otherwise the typed reply is rendered.
pub fn run(path: &Path, request: Request, json_output: bool) -> i32 {
    let (reply, line) = match call(path, &request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringlb ctl: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let code = if reply.is_ok() { EXIT_OK } else { EXIT_ERROR_REPLY };
    match &reply {
        _ if json_output => crate::output::print(&format!("{line}\n"), code),
        Reply::Error(e) => {
            eprintln!("error: {e}");
            code
        }
        ok => crate::output::print(&human(ok), code),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

/// One `ctl route` candidate: its address, configured weight and share of the table
/// (the table's own weights are scaled and mean nothing next to the configured one).
fn candidate(c: &Candidate) -> String {
    let full = if c.full {
        ", full: skipped by new connections"
    } else {
        ""
    };
    format!(
        "{} (weight {}, {:.1}% of the table{full})",
        c.addr,
        opt(&c.weight),
        c.table_share * 100.0
    )
}

/// One pool of a what-if reply (`ctl what-if` and the offline `ringlb what-if`).
pub fn human_what_if(p: &PoolMoves) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "pool {}:", p.pool);
    if let Some(note) = &p.note {
        let _ = writeln!(out, "  {note}");
    }
    if let Some(OldNew { old, new }) = p.table_size {
        if old != new {
            let _ = writeln!(out, "  table size {old} -> {new}: slots are reshuffled");
        }
    }
    for t in &p.key_space {
        let who = t
            .region
            .as_ref()
            .map_or_else(|| "all clients".to_string(), |r| format!("client region {r}"));
        let pct = |f: f64| format!("{:.2}%", f * 100.0);
        let _ = writeln!(out, "  {who}: {} of the key space moves", pct(t.moved_fraction));
        for m in &t.moves {
            let _ = writeln!(out, "    {:<24} -> {:<24} {:>8}", m.from, m.to, pct(m.fraction));
        }
        if t.moves_omitted > 0 {
            let _ = writeln!(out, "    ... and {} smaller moves", t.moves_omitted);
        }
    }
    out
}

/// Human-readable rendering of a reply.
pub fn human(reply: &Reply<'_>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match reply {
        Reply::Status(r) => {
            let _ = writeln!(out, "ringlb {}  up {}s  pid {}", r.version, r.uptime_seconds, r.pid);
            if let Some(p) = &r.predecessor {
                // During an upgrade: the process this one took over from.
                let _ = writeln!(
                    out,
                    "previous process {} (ringlb {}, config generation {}): draining, {} open connection(s)",
                    p.pid, p.version, p.config_generation, p.open_connections
                );
            }
            let _ = writeln!(
                out,
                "config {} (generation {}), snapshot generation {}",
                opt(&r.config),
                r.config_generation,
                r.snapshot_generation
            );
            for w in &r.workers {
                let cpu = w.cpu.map(|c| format!(", on cpu {c}")).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "worker {}: {} ({}), accepted {}{cpu}",
                    w.id, w.engine, w.setup, w.accepted
                );
            }
            let _ = writeln!(
                out,
                "{:<16} {:<24} {:<5} {:<16} {:>8}",
                "LISTENER", "BIND", "PROTO", "POOL", "ACTIVE"
            );
            for p in &r.pools {
                let _ = writeln!(
                    out,
                    "pool {}: fingerprint {}, table {} slots (generation {}, digest {}), {} of {} backends usable",
                    p.name,
                    p.fingerprint,
                    p.table_size,
                    p.table_generation,
                    opt(&p.table_digest),
                    p.usable_backends,
                    p.backends
                );
            }
            for l in &r.listeners {
                let _ = writeln!(
                    out,
                    "{:<16} {:<24} {:<5} {:<16} {:>8}",
                    l.name, l.bind, l.protocol, l.pool, l.active
                );
            }
        }
        Reply::Backends(r) => {
            for p in &r.pools {
                let panic = if p.panic { "  PANIC" } else { "" };
                let shown = p.backends.len();
                let page = if shown < p.total_backends {
                    format!(
                        ", backends {}-{} of {}",
                        (p.offset + 1).min(p.offset + shown),
                        p.offset + shown,
                        p.total_backends
                    )
                } else {
                    String::new()
                };
                let balance = if p.balance.is_empty() || p.balance == "maglev" {
                    String::new()
                } else {
                    format!(", balance {}", p.balance)
                };
                let backups = if p.backup_tier { "  BACKUPS SERVE" } else { "" };
                let _ = writeln!(
                    out,
                    "pool {} (table generation {}, digest {}, fingerprint {}{balance}{page}){panic}{backups}",
                    p.pool,
                    p.table_generation,
                    opt(&p.table_digest),
                    p.fingerprint
                );
                let _ = writeln!(
                    out,
                    "  {:<24} {:>6} {:<9} {:>7} {:>8} {:>12} {:>12} {:>8} {:<7}  REASON",
                    "BACKEND", "WEIGHT", "STATE", "ACTIVE", "TOTAL", "BYTES_IN", "BYTES_OUT", "FAILURES", "TIER"
                );
                for b in &p.backends {
                    // A check ringlb could not run leaves the state as it was; say so.
                    let not_run = match &b.last_check {
                        Some(c) if c.ok.is_none() => format!("; last check {}", c.detail),
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        out,
                        "  {:<24} {:>6} {:<9} {:>7} {:>8} {:>12} {:>12} {:>8} {:<7}  {}{not_run}",
                        b.addr.to_string(),
                        b.weight,
                        b.state,
                        b.active,
                        b.total,
                        b.bytes_in,
                        b.bytes_out,
                        b.failures,
                        if b.tier.is_empty() { "primary" } else { &b.tier },
                        b.reason
                    );
                }
            }
        }
        Reply::Route(r) => {
            let _ = writeln!(out, "client {} on listener {}", r.client, r.listener);
            if let Some(token) = &r.token {
                let _ = writeln!(out, "token   {token} (the client address does not count)");
            }
            if let Some(region) = &r.region {
                let _ = writeln!(out, "region  {region}");
            }
            let _ = writeln!(out, "table   {} (generation {})", r.table, r.table_generation);
            let candidates: Vec<String> = r.candidates.iter().map(candidate).collect();
            if !r.rule.is_empty() {
                let _ = writeln!(out, "rule    {}", r.rule);
            }
            for s in &r.skipped {
                let _ = writeln!(out, "skipped {}: {}", s.addr, s.why);
            }
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
            if !r.port_used {
                let _ = writeln!(
                    out,
                    "note    hash_key is src_ip_port and no port was given: port 0 was hashed"
                );
            }
        }
        Reply::WhatIf(r) => {
            let _ = writeln!(out, "what-if (nothing changed): {}", r.change);
            out.push_str(&human_what_if(&r.pool));
            let _ = writeln!(
                out,
                "  open UDP flows that would re-pick a backend: {}",
                r.udp_flows_repick
            );
        }
        Reply::Drain(r) => {
            let _ = writeln!(out, "ok: {} connection(s) remaining", r.remaining);
        }
        Reply::Remove(r) => {
            let _ = writeln!(out, "ok: {} connection(s) remaining", r.remaining);
        }
        Reply::Reload(r) => {
            let _ = writeln!(
                out,
                "reloaded (config generation {}): {} change(s)",
                r.config_generation,
                r.changes.len()
            );
            for c in &r.changes {
                let _ = writeln!(out, "  {c}");
            }
        }
        Reply::Stats(r) => {
            let _ = writeln!(
                out,
                "{:<16} {:>10} {:>8} {:>10} {:>14} {:>14}  REFUSED",
                "LISTENER", "ACCEPTED", "ACTIVE", "ACC_ERRORS", "BYTES_IN", "BYTES_OUT"
            );
            for l in &r.listeners {
                let refused: Vec<String> = l.refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    out,
                    "{:<16} {:>10} {:>8} {:>10} {:>14} {:>14}  {}",
                    l.name,
                    l.accepted,
                    l.active,
                    l.accept_errors,
                    l.bytes_in,
                    l.bytes_out,
                    refused.join(" ")
                );
            }
            for p in &r.pools {
                let _ = writeln!(
                    out,
                    "pool {}: table generation {}, last build {} us, panic {}",
                    p.name, p.table_generation, p.table_build_us, p.panic
                );
            }
        }
        Reply::Enable(_) | Reply::Weight(_) | Reply::Add(_) => {
            let _ = writeln!(out, "ok");
        }
        Reply::Error(e) => {
            let _ = writeln!(out, "error: {e}");
        }
    }
    out
}
