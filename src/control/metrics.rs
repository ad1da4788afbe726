//! Prometheus text exposition (format 0.0.4), served at `/metrics` by `control::http`.

use std::fmt::Write as _;

use crate::server::Server;
use crate::stats::{RefuseReason, LATENCY_BUCKETS};

fn family(out: &mut String, name: &str, kind: &str, help: &str) -> String {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name.to_string()
}

/// Metric text for the whole process.
pub fn render(server: &Server) -> String {
    let model = server.model.lock();
    let mut out = String::with_capacity(8192);
    // Families are written whole, one after another, as the format requires.
    macro_rules! each_listener {
        ($name:expr, $kind:expr, $help:expr, |$l:ident| $value:expr) => {{
            let n = family(&mut out, $name, $kind, $help);
            for $l in &model.listeners {
                let _ = writeln!(out, "{n}{{listener=\"{}\"}} {}", $l.config.name, $value);
            }
        }};
    }
    each_listener!(
        "ringlb_listener_connections_accepted_total",
        "counter",
        "Connections accepted.",
        |l| l.stats.accepted.get()
    );
    each_listener!(
        "ringlb_listener_connections_active",
        "gauge",
        "Connections being relayed.",
        |l| l.stats.active.current()
    );
    each_listener!(
        "ringlb_listener_received_bytes_total",
        "counter",
        "Bytes from clients to backends.",
        |l| l.stats.bytes_in.get()
    );
    each_listener!(
        "ringlb_listener_sent_bytes_total",
        "counter",
        "Bytes from backends to clients.",
        |l| l.stats.bytes_out.get()
    );
    each_listener!(
        "ringlb_listener_accept_errors_total",
        "counter",
        "Accept errors (EMFILE and others).",
        |l| l.stats.accept_errors.get()
    );
    let n = family(
        &mut out,
        "ringlb_listener_connections_refused_total",
        "counter",
        "Connections refused, by reason.",
    );
    for l in &model.listeners {
        for r in RefuseReason::ALL {
            let _ = writeln!(
                out,
                "{n}{{listener=\"{}\",reason=\"{}\"}} {}",
                l.config.name,
                r.label(),
                l.stats.refused[r as usize].get()
            );
        }
    }
    let n = family(
        &mut out,
        "ringlb_access_log_dropped_total",
        "counter",
        "JSON access log records dropped because the queue was full.",
    );
    let _ = writeln!(out, "{n} {}", crate::access_log::dropped());
    let n = family(
        &mut out,
        "ringlb_backend_connect_duration_seconds",
        "histogram",
        "Time to connect to a backend.",
    );
    for l in &model.listeners {
        let h = &l.stats.connect_latency;
        let cumulative = h.cumulative();
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{n}_bucket{{listener=\"{}\",le=\"{le}\"}} {}",
                l.config.name, cumulative[i]
            );
        }
        let count = *cumulative.last().unwrap_or(&0);
        let _ = writeln!(out, "{n}_bucket{{listener=\"{}\",le=\"+Inf\"}} {count}", l.config.name);
        let _ = writeln!(
            out,
            "{n}_sum{{listener=\"{}\"}} {}",
            l.config.name,
            h.sum_micros.get() as f64 / 1e6
        );
        let _ = writeln!(out, "{n}_count{{listener=\"{}\"}} {count}", l.config.name);
    }

    let now = std::time::Instant::now();
    macro_rules! each_backend {
        ($name:expr, $kind:expr, $help:expr, |$b:ident| $value:expr) => {{
            let n = family(&mut out, $name, $kind, $help);
            for p in &model.pools {
                for $b in &p.backends {
                    let _ = writeln!(
                        out,
                        "{n}{{pool=\"{}\",backend=\"{}\"}} {}",
                        p.config.name, $b.config.addr, $value
                    );
                }
            }
        }};
    }
    each_backend!(
        "ringlb_backend_connections_active",
        "gauge",
        "Open connections to the backend.",
        |b| b.shared.stats.conns.current()
    );
    each_backend!(
        "ringlb_backend_connections_total",
        "counter",
        "Connections made to the backend.",
        |b| b.shared.stats.conns.opened.get()
    );
    each_backend!(
        "ringlb_backend_sent_bytes_total",
        "counter",
        "Bytes sent to the backend.",
        |b| b.shared.stats.bytes_in.get()
    );
    each_backend!(
        "ringlb_backend_received_bytes_total",
        "counter",
        "Bytes received from the backend.",
        |b| b.shared.stats.bytes_out.get()
    );
    each_backend!(
        "ringlb_backend_connect_failures_total",
        "counter",
        "Failed or timed-out connects.",
        |b| b.shared.stats.connect_failures.get()
    );
    let n = family(
        &mut out,
        "ringlb_backend_sessions_closed_total",
        "counter",
        "Connections closed by the pool's session rules: reason=\"down\" (on_down = \"close\"), reason=\"primary_up\" (on_up = \"close_backups\").",
    );
    for p in &model.pools {
        for b in &p.backends {
            for (reason, v) in [
                ("down", b.sessions_closed.down),
                ("primary_up", b.sessions_closed.primary_up),
            ] {
                let _ = writeln!(
                    out,
                    "{n}{{pool=\"{}\",backend=\"{}\",reason=\"{reason}\"}} {v}",
                    p.config.name, b.config.addr
                );
            }
        }
    }
    each_backend!("ringlb_backend_weight", "gauge", "Configured weight.", |b| b
        .config
        .weight);
    let n = family(
        &mut out,
        "ringlb_backend_effective_weight",
        "gauge",
        "Weight in the pool's table (0 = gets no new clients).",
    );
    for p in &model.pools {
        for (i, b) in p.backends.iter().enumerate() {
            let _ = writeln!(
                out,
                "{n}{{pool=\"{}\",backend=\"{}\"}} {}",
                p.config.name,
                b.config.addr,
                p.published.weights.get(i).copied().unwrap_or(0)
            );
        }
    }
    each_backend!(
        "ringlb_backend_up",
        "gauge",
        "1 when healthy by active and passive checks.",
        |b| u8::from(b.healthy(now))
    );
    each_backend!(
        "ringlb_backend_ejections_total",
        "counter",
        "Passive-check ejections.",
        |b| b.outlier.ejections_total()
    );
    each_backend!(
        "ringlb_backend_check_duration_seconds",
        "gauge",
        "Duration of the last active check.",
        |b| b.last_check.as_ref().map_or(0.0, |c| c.1.as_secs_f64())
    );
    let n = family(
        &mut out,
        "ringlb_backend_state",
        "gauge",
        "1 for the backend's current state.",
    );
    for p in &model.pools {
        for b in &p.backends {
            let current = b.state_label(now);
            for s in ["active", "draining", "disabled", "down", "ejected"] {
                let _ = writeln!(
                    out,
                    "{n}{{pool=\"{}\",backend=\"{}\",state=\"{s}\"}} {}",
                    p.config.name,
                    b.config.addr,
                    u8::from(s == current)
                );
            }
        }
    }
    let n = family(
        &mut out,
        "ringlb_pool_table_generation",
        "gauge",
        "Generation of the pool's Maglev table.",
    );
    for p in &model.pools {
        let _ = writeln!(out, "{n}{{pool=\"{}\"}} {}", p.config.name, p.published.generation);
    }
    let n = family(
        &mut out,
        "ringlb_pool_fingerprint_info",
        "gauge",
        "1, labelled with the pool's fingerprint (same on instances that route alike) and its raw table digest.",
    );
    for p in model.pools.iter().filter(|p| !p.retired) {
        let fp = crate::fleet::fingerprint::pool_fingerprint(&p.published, p.config.table_size);
        // The raw `MaglevTable::digest` too (it depends on the order the
        // backends are listed in; the fingerprint does not).
        let digest = p
            .published
            .table
            .as_ref()
            .map_or(String::new(), |t| format!("{:016x}", t.digest()));
        let _ = writeln!(
            out,
            "{n}{{pool=\"{}\",fingerprint=\"{}\",table_digest=\"{digest}\"}} 1",
            p.config.name,
            crate::fleet::fingerprint::hex(fp)
        );
    }
    let n = family(
        &mut out,
        "ringlb_pool_table_size",
        "gauge",
        "Configured Maglev table size.",
    );
    for p in model.pools.iter().filter(|p| !p.retired) {
        let _ = writeln!(out, "{n}{{pool=\"{}\"}} {}", p.config.name, p.config.table_size);
    }
    let n = family(
        &mut out,
        "ringlb_pool_table_build_seconds",
        "gauge",
        "Time the last table build took.",
    );
    for p in &model.pools {
        let _ = writeln!(
            out,
            "{n}{{pool=\"{}\"}} {}",
            p.config.name,
            p.published.build_time.as_secs_f64()
        );
    }
    let n = family(
        &mut out,
        "ringlb_pool_panic",
        "gauge",
        "1 while the pool is in panic mode.",
    );
    for p in &model.pools {
        let _ = writeln!(out, "{n}{{pool=\"{}\"}} {}", p.config.name, u8::from(p.panic));
    }
    let n = family(&mut out, "ringlb_workers", "gauge", "Worker threads.");
    let _ = writeln!(out, "{n} {}", server.shared.workers);
    let n = family(
        &mut out,
        "ringlb_config_generation",
        "gauge",
        "Successful config loads.",
    );
    let _ = writeln!(out, "{n} {}", model.config_generation);
    let n = family(
        &mut out,
        "ringlb_snapshot_generation",
        "gauge",
        "Routing snapshots published.",
    );
    let _ = writeln!(out, "{n} {}", model.generation());
    let n = family(&mut out, "ringlb_uptime_seconds", "gauge", "Seconds since start.");
    let _ = writeln!(out, "{n} {}", server.shared.started.elapsed().as_secs_f64());

    // Saturation and failure families for the dashboard and the alert rules
    // (config/grafana-dashboard.json, config/prometheus-alerts.yml); added after the
    // families above, which keep their order and text.
    let tcp = |l: &&crate::model::ListenerState| l.config.protocol == crate::config::Protocol::Tcp;
    let n = family(
        &mut out,
        "ringlb_listener_connections_max",
        "gauge",
        "TCP listener max_connections (0 = no limit).",
    );
    for l in model.listeners.iter().filter(tcp) {
        let _ = writeln!(
            out,
            "{n}{{listener=\"{}\"}} {}",
            l.config.name, l.config.max_connections
        );
    }
    let n = family(
        &mut out,
        "ringlb_listener_flows_max",
        "gauge",
        "UDP listener max_flows: the flow table's size across workers (its fill is ringlb_listener_connections_active).",
    );
    for l in model.listeners.iter().filter(|l| !tcp(l)) {
        let _ = writeln!(out, "{n}{{listener=\"{}\"}} {}", l.config.name, l.config.max_flows);
    }
    let n = family(
        &mut out,
        "ringlb_listener_sources_tracked",
        "gauge",
        "Sources in the listener's per-source rate-limit table.",
    );
    for l in &model.listeners {
        if let Some(st) = l.limits.source_stats() {
            let _ = writeln!(out, "{n}{{listener=\"{}\"}} {}", l.config.name, st.len);
        }
    }
    let n = family(
        &mut out,
        "ringlb_listener_sources_capacity",
        "gauge",
        "Size of the per-source rate-limit table (max_sources).",
    );
    for l in &model.listeners {
        if let Some(t) = &l.limits.connections {
            let _ = writeln!(out, "{n}{{listener=\"{}\"}} {}", l.config.name, t.capacity());
        }
    }
    each_backend!(
        "ringlb_backend_connections_max",
        "gauge",
        "Backend max_connections (0 = no limit).",
        |b| b.config.max_connections
    );
    let n = family(
        &mut out,
        "ringlb_pool_table_build_failures_total",
        "counter",
        "Table builds that failed; the pool kept its last table.",
    );
    for p in &model.pools {
        let _ = writeln!(out, "{n}{{pool=\"{}\"}} {}", p.config.name, p.build_failures);
    }
    let n = family(
        &mut out,
        "ringlb_config_reloads_rejected_total",
        "counter",
        "Reloads (SIGHUP, ctl reload) rejected; the running config was kept.",
    );
    let _ = writeln!(
        out,
        "{n} {}",
        server.reloads.rejected.load(std::sync::atomic::Ordering::Relaxed)
    );
    let n = family(
        &mut out,
        "ringlb_config_last_reload_successful",
        "gauge",
        "1 when the last reload was applied (or none was tried), 0 when it was rejected.",
    );
    let _ = writeln!(
        out,
        "{n} {}",
        u8::from(server.reloads.last_ok.load(std::sync::atomic::Ordering::Relaxed))
    );
    out
}
