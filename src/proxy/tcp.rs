//! Per-connection TCP path: accept → pick backend → connect with retry → relay.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{shutdown_fd, Engine, RelayStream};
use crate::flow_key::flow_hash;
use crate::snapshot::Backend;
use crate::stats::RefuseReason;
use crate::worker::{StopSignal, WorkerCtx};

use super::relay::{relay, DirectionCounters, RelayEnd};

/// Pause after an accept error caused by resource exhaustion (EMFILE and
/// friends) so the loop doesn't spin while the pressure lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// At most one accept-error warning per listener and worker in this period.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(5);

/// Accepts on one listener until its stop signal fires.
///
/// Stopping shuts the listening socket down, which completes the pending
/// accept with an error; the accept is never dropped half-done (tokio-uring
/// leaks the fd of an accept that completes after its future was dropped).
pub async fn accept_loop<E: Engine>(
    ctx: Rc<WorkerCtx>,
    slot: usize,
    name: String,
    listener: E::Listener,
    stop: Arc<StopSignal>,
) {
    let fd = E::listener_fd(&listener);
    {
        let stop = stop.clone();
        E::spawn(async move {
            stop.wait().await;
            shutdown_fd(fd, Shutdown::Both);
        });
    }
    let mut last_warn: Option<Instant> = None;
    loop {
        match E::accept(&listener).await {
            Ok((stream, peer)) => E::spawn(handle_connection::<E>(ctx.clone(), slot, stream, peer)),
            Err(_) if stop.is_stopped() => break,
            Err(e) => {
                if let Some(l) = ctx.snapshot().listener(slot) {
                    l.stats.accept_errors.inc();
                }
                if last_warn.is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY) {
                    log::warn!(
                        "worker {}: listener \"{name}\": accept failed: {e} (further errors for 5s not logged)",
                        ctx.id
                    );
                    last_warn = Some(Instant::now());
                }
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    log::debug!("worker {}: listener \"{name}\" stopped accepting", ctx.id);
}

/// Connects to `addr` within `timeout`. The connect runs on tokio's reactor
/// on both engines because it can be cancelled there: a timed-out connect
/// closes its socket at once.
async fn connect<E: Engine>(addr: SocketAddr, timeout: Duration) -> io::Result<E::Stream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    E::from_tokio(stream)
}

fn close_now<S: RelayStream>(stream: &S) {
    shutdown_fd(stream.fd(), Shutdown::Both);
}

/// Serves one accepted client connection.
async fn handle_connection<E: Engine>(ctx: Rc<WorkerCtx>, slot: usize, client: E::Stream, peer: SocketAddr) {
    let snapshot = ctx.snapshot();
    let Some(listener) = snapshot.listener(slot) else {
        close_now(&client);
        return;
    };
    let stats = listener.stats.clone();
    let config = listener.config.clone();
    stats.accepted.inc();
    let pool = &snapshot.pools[listener.pool];
    let Some(table) = &pool.table else {
        stats.refuse(RefuseReason::NoBackend);
        close_now(&client);
        return;
    };

    let hash = flow_hash(peer, config.hash_key);
    let mut connected: Option<(Arc<Backend>, E::Stream)> = None;
    for index in table.candidates(hash, config.connect_attempts as usize) {
        let backend = &pool.backends[index as usize];
        let connect_started = Instant::now();
        match connect::<E>(backend.addr, config.connect_timeout).await {
            Ok(stream) => {
                stats.connect_latency.observe(connect_started.elapsed());
                backend.connect_succeeded();
                connected = Some((backend.clone(), stream));
                break;
            }
            Err(e) => {
                let in_a_row = backend.connect_failed();
                log::debug!("{peer} -> {}: connect failed ({in_a_row} in a row): {e}", backend.addr);
            }
        }
    }
    drop(snapshot);
    let Some((backend, server)) = connected else {
        stats.refuse(RefuseReason::ConnectFailed);
        close_now(&client);
        return;
    };

    stats.active.opened.inc();
    backend.stats.conns.opened.inc();
    let started = Instant::now();
    let (end, up, down) = relay(
        &client,
        &server,
        &ctx.bufs,
        config.idle_timeout,
        DirectionCounters {
            listener: &stats.bytes_in,
            backend: &backend.stats.bytes_in,
        },
        DirectionCounters {
            listener: &stats.bytes_out,
            backend: &backend.stats.bytes_out,
        },
        ctx.close_requested(&backend, &stats),
    )
    .await;
    close_now(&client);
    close_now(&server);
    backend.stats.conns.closed.inc();
    stats.active.closed.inc();
    if ctx.shared.access_log.load(std::sync::atomic::Ordering::Relaxed) {
        let how = match end {
            RelayEnd::Finished => "done",
            RelayEnd::IdleTimeout => "idle timeout",
            RelayEnd::Closed => "closed by ringlb",
        };
        log::info!(
            "{peer} -> {} via \"{}\": {up} bytes up, {down} bytes down, {:.3}s, {how}",
            backend.addr,
            config.name,
            started.elapsed().as_secs_f64()
        );
    }
}
