//! The demo's failover story: a primary steps down, ringlb closes its sessions and the clients reach the new primary.
//!
//! Patroni-style: each database backend has a role endpoint on the health check's
//! port answering `GET /primary` with 200 on the primary and 503 elsewhere. The
//! demo opens a few client sessions (all on the primary), flips the roles and
//! measures, for real, when each session sees its end and when the reconnecting
//! clients are first served by the new primary; it reads the count of closed
//! sessions from ringlb's metrics. Every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{CheckKind, Config, ListenerConfig, OnDown, PoolConfig};

/// The demo's database listener and pool (config/demo.toml).
pub const POOL: &str = "db";

/// Client sessions opened on the primary before it steps down.
const SESSIONS: usize = 5;

/// The longest any step of the story may take before the demo fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which backend of the pool is the primary (its index), shared with the role endpoints.
pub struct Roles {
    primary: Arc<AtomicUsize>,
}

/// Starts the role endpoints of `pool`, one per backend on its address and the health
/// check's port, with the first backend as the primary.
pub fn start_role_endpoints(pool: &PoolConfig) -> Result<Roles, String> {
    let port = pool
        .health_check
        .port
        .ok_or_else(|| format!("config/demo.toml: pool \"{}\" needs health_check.port", pool.name))?;
    let primary = Arc::new(AtomicUsize::new(0));
    for (i, b) in pool.backends.iter().enumerate() {
        let addr = SocketAddr::new(b.addr.ip(), port);
        let listener = TcpListener::bind(addr).map_err(|e| format!("demo role endpoint {addr}: {e}"))?;
        let primary = primary.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                answer_role(stream, primary.load(Ordering::SeqCst) == i);
            }
        });
    }
    Ok(Roles { primary })
}

/// One role request, answered the way Patroni's REST API does: `/primary` is 200
/// on the primary and 503 elsewhere. Checks come one at a time per backend, so
/// answering inline is enough; the read is bounded in size and time.
fn answer_role(mut stream: TcpStream, is_primary: bool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while request.len() < 4096 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if !request.starts_with(b"GET /primary ") {
        ("404 Not Found", "not found\n")
    } else if is_primary {
        ("200 OK", "{\"role\": \"primary\"}\n")
    } else {
        ("503 Service Unavailable", "{\"role\": \"replica\"}\n")
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// What one client saw after the roles flipped.
struct ClientTimes {
    /// Its session on the old primary ended (EOF or reset).
    closed: Duration,
    /// It was first served by the new primary again.
    reconnected: Duration,
}

/// Waits (bounded) for the session to end, then reconnects until the new primary
/// serves it, as a database client with a retry loop does.
fn follow(session: TcpStream, listen: SocketAddr, new_primary: String, t0: Instant) -> Result<ClientTimes, String> {
    let deadline = t0 + STEP_TIMEOUT;
    let mut s = session;
    let mut buf = [0u8; 64];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "a session was still open {STEP_TIMEOUT:?} after the primary stepped down"
            ));
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => break t0.elapsed(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break t0.elapsed(), // a reset ends it too
        }
    };
    drop(s);
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "no connection reached the new primary {new_primary} within {STEP_TIMEOUT:?}"
            ));
        }
        // While the pool has no usable backend ringlb refuses: retry shortly.
        if let Ok((_, who)) = super::open_session(listen, Duration::from_secs(2)) {
            if who == new_primary {
                return Ok(ClientTimes {
                    closed,
                    reconnected: t0.elapsed(),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sums `ringlb_backend_sessions_closed_total{pool, backend, reason="down"}` from the
/// metrics endpoint (one bounded HTTP GET).
fn sessions_closed(metrics: SocketAddr, pool: &str, backend: SocketAddr) -> Result<u64, String> {
    let text = crate::fleet::check::fetch_metrics(metrics).map_err(|e| format!("metrics {metrics}: {e}"))?;
    let series =
        format!("ringlb_backend_sessions_closed_total{{pool=\"{pool}\",backend=\"{backend}\",reason=\"down\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| format!("metrics {metrics}: no {}", series.trim_end()))
}

fn describe(pool: &PoolConfig) -> String {
    let hc = &pool.health_check;
    let check = match &hc.kind {
        CheckKind::Http(h) => format!(
            "{} {} on :{}",
            h.method,
            h.path,
            hc.port.map(|p| p.to_string()).unwrap_or_default()
        ),
        _ => "its health check".to_string(),
    };
    format!(
        "checked like Patroni ({check} every {}ms, fall {}, rise {}), on_down = \"{}\"",
        hc.interval.as_millis(),
        hc.fall,
        hc.rise,
        if pool.on_down == OnDown::Close { "close" } else { "keep" }
    )
}

/// Tells the story on `listener` in front of `pool`: sessions on the primary, the
/// role flip, the sessions closed and the clients on the new primary, with the times.
pub fn run(config: &Config, listener: &ListenerConfig, pool: &PoolConfig, roles: &Roles) -> Result<(), String> {
    let listen = listener.bind;
    let (old, new) = match pool.backends.as_slice() {
        [a, b, ..] => (a.addr, b.addr),
        _ => return Err(format!("config/demo.toml: pool \"{}\" needs two backends", pool.name)),
    };
    println!(
        "\ndemo: failover: pool \"{}\" ({old} primary, {new} replica), {}",
        pool.name,
        describe(pool)
    );
    // The primary comes up after `rise` passed checks; the replica stays down.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut sessions = Vec::with_capacity(SESSIONS);
    while sessions.len() < SESSIONS {
        match super::open_session(listen, Duration::from_secs(2)) {
            Ok((s, who)) if who == old.to_string() => sessions.push(s),
            Ok((_, who)) => return Err(format!("a session reached {who}, not the primary {old}")),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("no session through {listen} within {STEP_TIMEOUT:?}: {e}")),
        }
    }
    println!("demo: {SESSIONS} client sessions open through {listen}, all on {old} (the primary)");

    roles.primary.store(1, Ordering::SeqCst);
    let t0 = Instant::now();
    println!("demo: the primary steps down (its /primary answers 503); {new} is promoted (200)");
    let clients: Vec<_> = sessions
        .into_iter()
        .map(|s| {
            let new = new.to_string();
            std::thread::spawn(move || follow(s, listen, new, t0))
        })
        .collect();
    let mut times = Vec::with_capacity(SESSIONS);
    for c in clients {
        times.push(c.join().map_err(|_| "a demo client panicked".to_string())??);
    }
    let last_closed = times.iter().map(|t| t.closed).max().unwrap_or_default();
    let first_new = times.iter().map(|t| t.reconnected).min().unwrap_or_default();

    // The counter is the model's: read it until it shows the closes (bounded).
    let metrics = config
        .control
        .metrics
        .ok_or("config/demo.toml: the demo needs [control] metrics")?;
    let counted_by = Instant::now() + Duration::from_secs(2);
    let closed = loop {
        let n = sessions_closed(metrics, &pool.name, old)?;
        if n as usize >= SESSIONS || Instant::now() > counted_by {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // `closed` is ringlb's own count (ringlb_backend_sessions_closed_total); the
    // clients' view is printed beside it, so a mismatch shows.
    println!(
        "demo: +{:.2} s: ringlb closed the {closed} sessions on {old} ({} failed checks: its /primary answers 503); {SESSIONS} of {SESSIONS} clients saw the end",
        last_closed.as_secs_f64(),
        pool.health_check.fall,
    );
    println!(
        "demo: +{:.2} s: the clients reconnect and reach {new}, the new primary (failover took {:.2} s)",
        first_new.as_secs_f64(),
        first_new.as_secs_f64(),
    );
    Ok(())
}
