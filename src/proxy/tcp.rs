//! Per-connection TCP path: accept → pick backend → connect with retry → relay.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{shutdown_fd, Engine, RelayStream};
use crate::fd_reserve::{client_waiting, is_out_of_descriptors};
use crate::flow_key::flow_hash;
use crate::snapshot::Backend;
use crate::stats::RefuseReason;
use crate::worker::{StopSignal, WorkerCtx};

use super::proxy_protocol;
use super::relay::{relay, CopyPump, DirectionCounters, RelayEnd};
use super::splice::SplicePump;
use crate::config::{ProxyProtocol, RelayMode};

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
            Ok((stream, peer)) => {
                if ctx.fd_reserve.is_short() {
                    // Its last refill met EMFILE; descriptors are free again.
                    ctx.fd_reserve.refill();
                }
                E::spawn(handle_connection::<E>(ctx.clone(), slot, stream, peer))
            }
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
                    let refused = shed_pending(&ctx, fd);
                    if let Some(l) = ctx.snapshot().listener(slot) {
                        l.stats.refused[RefuseReason::Overloaded as usize].add(refused);
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    log::debug!("worker {}: listener \"{name}\" stopped accepting", ctx.id);
}

/// Out of descriptors: frees the worker's spare one and uses it to accept and
/// reset the clients waiting in the backlog (up to a batch), so they are
/// refused at once rather than left hanging; then takes the spare back.
/// Established connections are untouched. Returns how many were refused.
fn shed_pending(ctx: &WorkerCtx, listener_fd: std::os::fd::RawFd) -> u64 {
    const BATCH: u64 = 256;
    let reserve = &ctx.fd_reserve;
    let mut refused = 0;
    reserve.refill();
    // EMFILE comes before the kernel looks for a waiting client: with none
    // waiting, a spare given up here would only go to someone else.
    if client_waiting(listener_fd) && reserve.release_one() {
        while refused < BATCH && client_waiting(listener_fd) {
            // SAFETY: accept4 on our listening socket; the new fd is closed below.
            let fd = unsafe {
                libc::accept4(
                    listener_fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                break;
            }
            reset_on_close(fd);
            // SAFETY: closes the fd accept4 just returned, owned by nobody else.
            unsafe { libc::close(fd) };
            refused += 1;
        }
        reserve.refill();
    }
    refused
}

/// Connects to `addr` and sends `first` (a PROXY protocol header, or
/// nothing), all within `timeout`. The connect runs on tokio's reactor on
/// both engines because it can be cancelled there: a timed-out connect
/// closes its socket at once.
async fn connect(addr: SocketAddr, timeout: Duration, first: &[u8]) -> io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    let stream = tokio::time::timeout(timeout, async {
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        if !first.is_empty() {
            // A new socket's send buffer is empty: this completes at once
            // unless the backend is already gone.
            tokio::io::AsyncWriteExt::write_all(&mut stream, first).await?;
        }
        Ok::<_, io::Error>(stream)
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(stream)
}

/// The address the client connected to: the listener's own unless it is
/// bound to a wildcard, else asked of the socket (one getsockname, only with
/// PROXY protocol on).
fn local_addr_of<S: RelayStream>(client: &S, bind: SocketAddr) -> io::Result<SocketAddr> {
    if !bind.ip().is_unspecified() {
        return Ok(bind);
    }
    // SAFETY: the fd belongs to `client`, which outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(client.fd()) };
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))
}

fn close_now<S: RelayStream>(stream: &S) {
    shutdown_fd(stream.fd(), Shutdown::Both);
}

/// Refuses an accepted client with a reset (SO_LINGER 0, then close on
/// drop). Chosen over a FIN for admission refusals: the client learns at
/// once (ECONNRESET on its first read or write), and ringlb keeps no socket
/// in FIN_WAIT/TIME_WAIT for a flood of refused connections.
fn reset_now<S: RelayStream>(stream: &S) {
    reset_on_close(stream.fd());
}

/// SO_LINGER 0: the next close of `fd` sends a reset instead of a FIN.
fn reset_on_close(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` is an open socket of ours for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

/// Most backends looked at per connection (spill-over past full backends).
const MAX_CANDIDATES: usize = 16;

/// Releases a connection's admission counts when it ends.
struct Admitted<'a> {
    limits: &'a crate::admission::limits::ListenerLimits,
    source: crate::admission::SourceKey,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.limits.release(self.source);
    }
}

/// Gives back a backend connection slot when the connection ends.
struct BackendSlot<'a> {
    backend: &'a Backend,
    counted: bool,
}

impl Drop for BackendSlot<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.backend.release_slot();
        }
    }
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
    let limits = listener.limits.clone();
    stats.accepted.inc();

    let source = limits.source_key(peer.ip());
    if let Err(reason) = limits.admit_connection(source, Instant::now()) {
        stats.refuse(reason);
        reset_now(&client);
        return;
    }
    // Released when this function returns, however it returns.
    let _admitted = Admitted {
        limits: &limits,
        source,
    };

    let pool = &snapshot.pools[listener.pool];
    let Some(table) = pool.table_for(peer.ip()).0 else {
        stats.refuse(RefuseReason::NoBackend);
        close_now(&client);
        return;
    };

    let proxy_header = match config.proxy_protocol {
        ProxyProtocol::Off => None,
        version => match local_addr_of(&client, config.bind) {
            Ok(local) => proxy_protocol::header(version, peer, local),
            Err(e) => {
                log::debug!("{peer}: no local address for the PROXY header: {e}");
                stats.refuse(RefuseReason::ConnectFailed);
                close_now(&client);
                return;
            }
        },
    };
    let first: &[u8] = proxy_header.as_ref().map_or(&[], |h| h.bytes());

    // Walk the key's preference order: backends at their max_connections are
    // skipped (spill-over) without using up a connect attempt.
    let hash = flow_hash(peer, config.hash_key);
    let mut connected: Option<(Arc<Backend>, tokio::net::TcpStream, bool)> = None;
    let (mut attempts, mut full, mut overloaded) = (0, 0, false);
    for index in table.candidates(hash, MAX_CANDIDATES) {
        let backend = &pool.backends[index as usize];
        let Some(counted) = backend.try_take_slot() else {
            full += 1;
            continue;
        };
        attempts += 1;
        let connect_started = Instant::now();
        match connect(backend.addr, config.connect_timeout, first).await {
            Ok(stream) => {
                stats.connect_latency.observe(connect_started.elapsed());
                backend.connect_succeeded();
                connected = Some((backend.clone(), stream, counted));
                break;
            }
            Err(e) => {
                if counted {
                    backend.release_slot();
                }
                if is_out_of_descriptors(&e) {
                    // Our own descriptor shortage, not the backend's fault.
                    overloaded = true;
                    break;
                }
                let in_a_row = backend.connect_failed();
                log::debug!("{peer} -> {}: connect failed ({in_a_row} in a row): {e}", backend.addr);
            }
        }
        if attempts >= config.connect_attempts {
            break;
        }
    }
    drop(snapshot);
    let Some((backend, server, counted)) = connected else {
        stats.refuse(if overloaded {
            RefuseReason::Overloaded
        } else if attempts == 0 && full > 0 {
            RefuseReason::BackendFull
        } else {
            RefuseReason::ConnectFailed
        });
        close_now(&client);
        return;
    };
    let _slot = BackendSlot {
        backend: &backend,
        counted,
    };

    stats.active.opened.inc();
    backend.stats.conns.opened.inc();
    let started = Instant::now();
    let up = DirectionCounters {
        listener: &stats.bytes_in,
        backend: &backend.stats.bytes_in,
    };
    let down = DirectionCounters {
        listener: &stats.bytes_out,
        backend: &backend.stats.bytes_out,
    };
    let close = ctx.close_requested(&backend, &stats);
    let (end, up, down) = match config.relay {
        RelayMode::Copy => match E::from_tokio(server) {
            Ok(server) => {
                // The relay leaves no op in flight, so dropping both streams
                // closes them; no extra shutdown(2) calls.
                relay(
                    &client,
                    &server,
                    &CopyPump(&ctx.bufs),
                    config.idle_timeout,
                    up,
                    down,
                    close,
                )
                .await
            }
            Err(_) => {
                close_now(&client);
                (RelayEnd::Finished, 0, 0)
            }
        },
        mode => match E::into_tokio(client) {
            Ok(client) => {
                let pump = SplicePump {
                    bufs: &ctx.bufs,
                    pipes: &ctx.pipes,
                    auto: mode == RelayMode::Auto,
                };
                relay(&client, &server, &pump, config.idle_timeout, up, down, close).await
            }
            Err(_) => (RelayEnd::Finished, 0, 0),
        },
    };
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
