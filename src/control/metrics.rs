//! Prometheus text exposition (format 0.0.4) and its tiny HTTP endpoint.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::fd_reserve::FdReserve;
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
    each_backend!("ringlb_backend_weight", "gauge", "Configured weight.", |b| b
        .config
        .weight);
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
    out
}

/// Scrapers served at once; a connection beyond them is closed at once.
pub const MAX_SCRAPERS: usize = 64;

/// Time a scraper has to send its request head. A scraper on the same network sends it
/// right after connecting; an idle client holds a slot for at most this long, so idle
/// clients can keep scrapes out only by holding all [`MAX_SCRAPERS`] slots, and then
/// for at most this long after they stop reconnecting.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// Time to write the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` (HTTP/1.0-style: one response, then close).
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    // Scrapes go on when the data plane has used every other descriptor.
    let reserve = Arc::new(FdReserve::new(2));
    loop {
        let stream = reserve.accept(listener.as_raw_fd(), || listener.accept()).await.0;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let server = server.clone();
        let reserve = reserve.clone();
        tokio::spawn(async move {
            answer_scrape(stream, &server).await;
            drop(permit);
            reserve.refill();
        });
    }
}

/// Reads one request head within [`HEAD_TIMEOUT`] and answers it within
/// [`WRITE_TIMEOUT`].
async fn answer_scrape(mut stream: tokio::net::TcpStream, server: &Server) {
    let mut head = vec![0u8; 8192];
    let mut len = 0;
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        while len < head.len() {
            let n = stream.read(&mut head[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let request = String::from_utf8_lossy(&head[..len]);
    let response = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
        let body = render(server);
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\n\r\ntry GET /metrics\r\n\r\n".to_string()
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}
