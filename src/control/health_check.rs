//! One active health check: connect, then a reply prefix or a protocol exchange
//! (the sans-io [`crate::health::probe`]) decides.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::CheckKind;
use crate::health::probe::{Exchange, Step, MAX_REPLY};

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckVerdict {
    /// The backend answered as expected.
    Passed,
    /// The backend refused, reset, timed out or answered wrong.
    Failed,
    /// The check could not run for a reason inside ringlb (out of
    /// descriptors, memory or local ports): it says nothing about the
    /// backend, so it must not count against it. Otherwise a saturated
    /// balancer would mark every backend down and turn overload into an
    /// outage.
    NotRun,
}

impl CheckVerdict {
    /// `Some(passed)`, or None when the check did not run.
    pub fn passed(self) -> Option<bool> {
        match self {
            CheckVerdict::Passed => Some(true),
            CheckVerdict::Failed => Some(false),
            CheckVerdict::NotRun => None,
        }
    }
}

/// Runs one check within `timeout`; returns the verdict, latency, and a detail for logs.
pub async fn run_check(target: SocketAddr, kind: &CheckKind, timeout: Duration) -> (CheckVerdict, Duration, String) {
    if let Some(exchange) = exchange_for(kind, target) {
        return run_exchange(target, exchange, timeout).await;
    }
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, check(target, kind)).await;
    let latency = started.elapsed();
    match result {
        Ok(Ok(())) => (CheckVerdict::Passed, latency, "ok".into()),
        Ok(Err(Failure::Backend(detail))) => (CheckVerdict::Failed, latency, detail),
        Ok(Err(Failure::Local(detail))) => (CheckVerdict::NotRun, latency, detail),
        Err(_) => (CheckVerdict::Failed, latency, format!("timed out after {timeout:?}")),
    }
}

/// Why a check did not pass: the backend's doing, or ringlb's own.
enum Failure {
    Backend(String),
    Local(String),
}

impl From<String> for Failure {
    fn from(detail: String) -> Failure {
        Failure::Backend(detail)
    }
}

async fn check(target: SocketAddr, kind: &CheckKind) -> Result<(), Failure> {
    if let CheckKind::UdpSendExpect { send, expect } = kind {
        return check_udp(target, send, expect).await;
    }
    // The stream is dropped (closed) on every path, including the timeout
    // above, because this runs on tokio's reactor where drop cancels.
    let connect_only = matches!(kind, CheckKind::Tcp);
    let mut stream = connect(target, connect_only).await?;
    let CheckKind::SendExpect { send, expect } = kind else {
        // A connect check has nothing to say: end it with a reset (as
        // HAProxy's checks do) rather than a FIN exchange. That is one
        // packet instead of four, and no TIME_WAIT entry on ringlb's side
        // per check, which at 10,000 checked backends was most of the
        // control thread's time (kernel work in close and in connect's
        // port search). Zero linger never blocks on drop.
        let _ = stream.set_zero_linger();
        return Ok(());
    };
    if !send.is_empty() {
        stream
            .write_all(send)
            .await
            .map_err(|e| format!("send failed: {}", describe(&e)))?;
    }
    let mut got = vec![0u8; expect.len()];
    let mut filled = 0;
    while filled < expect.len() {
        let n = stream
            .read(&mut got[filled..])
            .await
            .map_err(|e| format!("read failed: {}", describe(&e)))?;
        if n == 0 {
            return Err(Failure::Backend(format!(
                "closed after {filled} byte(s) of reply, expected {:?}",
                String::from_utf8_lossy(expect)
            )));
        }
        if got[filled..filled + n] != expect[filled..filled + n] {
            filled += n;
            return Err(Failure::Backend(format!(
                "reply {:?} does not start with {:?}",
                String::from_utf8_lossy(&got[..filled]),
                String::from_utf8_lossy(expect)
            )));
        }
        filled += n;
    }
    Ok(())
}

/// Connects to `target`. For a connect-only check, quick ACKs are off first:
/// the kernel then holds back the handshake's last ACK (it would ride on the
/// first data), the connect completes on the backend's SYN-ACK, and the reset
/// at close reaches the backend while its side is still half-open. So the
/// backend's kernel never builds, queues and hands its application a
/// connection that would only be reset, and its application sees no check
/// traffic at all. The check still proves what a connect check proves: a
/// listener that answers (a full accept queue drops the SYN, and the check
/// times out). HAProxy's connect checks work the same way; on loopback it
/// halves the kernel time per check, counting both sides.
async fn connect(target: SocketAddr, connect_only: bool) -> Result<tokio::net::TcpStream, Failure> {
    let socket = match target {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| classify(&e))?;
    if connect_only {
        // Best effort: without it the check is the same, only dearer.
        let _ = socket2::SockRef::from(&socket).set_quickack(false);
    }
    socket.connect(target).await.map_err(|e| classify(&e))
}

/// The protocol exchange for `kind` against `target`, or None for the kinds that are
/// not protocol checks (tcp, send_expect, udp_send_expect, none).
pub fn exchange_for(kind: &CheckKind, target: SocketAddr) -> Option<Exchange> {
    use crate::health::probe::{http, mysql, postgres, redis};
    Some(match kind {
        CheckKind::Http(c) => Exchange::Http(http::HttpExchange::new(c, target)),
        CheckKind::Postgres(c) => Exchange::Postgres(postgres::PostgresExchange::new(c)),
        CheckKind::Mysql(c) => Exchange::Mysql(mysql::MysqlExchange::new(c)),
        CheckKind::Redis(c) => Exchange::Redis(redis::RedisExchange::new(c)),
        CheckKind::None | CheckKind::Tcp | CheckKind::SendExpect { .. } | CheckKind::UdpSendExpect { .. } => {
            return None
        }
    })
}

/// A protocol check: the exchange runs within `timeout`; the goodbye after a verdict
/// gets what is left of it (at least [`MIN_GOODBYE`]) and never changes the verdict.
async fn run_exchange(
    target: SocketAddr,
    mut exchange: Exchange,
    timeout: Duration,
) -> (CheckVerdict, Duration, String) {
    let started = Instant::now();
    let mut reply = Vec::new();
    let result = tokio::time::timeout(timeout, converse(target, &mut exchange, &mut reply)).await;
    let latency = started.elapsed();
    match result {
        Ok(Ok((verdict, mut stream, farewell, await_close))) => {
            let left = timeout.saturating_sub(latency).max(MIN_GOODBYE);
            let _ = tokio::time::timeout(left, goodbye(&mut stream, &farewell, await_close)).await;
            let passed = if verdict.up {
                CheckVerdict::Passed
            } else {
                CheckVerdict::Failed
            };
            (passed, latency, verdict.reason)
        }
        Ok(Err(Failure::Backend(detail))) => (CheckVerdict::Failed, latency, detail),
        Ok(Err(Failure::Local(detail))) => (CheckVerdict::NotRun, latency, detail),
        Err(_) => (
            CheckVerdict::Failed,
            latency,
            if reply.is_empty() {
                format!("timed out after {timeout:?} with no reply")
            } else {
                format!(
                    "timed out after {timeout:?}, {} byte(s) of reply: {}",
                    reply.len(),
                    crate::health::probe::printable(&reply, 40)
                )
            },
        ),
    }
}

/// The least time a check waits for the server to close after its verdict.
const MIN_GOODBYE: Duration = Duration::from_millis(50);

/// Connect, send the opening, and read (at most [`MAX_REPLY`] bytes per reply) until
/// the exchange decides. `reply` holds the current reply, for the timeout's message.
async fn converse(
    target: SocketAddr,
    exchange: &mut Exchange,
    reply: &mut Vec<u8>,
) -> Result<(crate::health::probe::Verdict, tokio::net::TcpStream, Vec<u8>, bool), Failure> {
    let mut stream = connect(target, false).await?;
    let _ = stream.set_nodelay(true);
    let opening = exchange.opening();
    if !opening.is_empty() {
        stream
            .write_all(&opening)
            .await
            .map_err(|e| format!("send failed: {}", describe(&e)))?;
    }
    loop {
        let start = reply.len();
        let mut ended = start >= MAX_REPLY;
        if !ended {
            reply.resize(start + (MAX_REPLY - start).min(4096), 0);
            match stream.read(&mut reply[start..]).await {
                Ok(n) => {
                    reply.truncate(start + n);
                    ended = n == 0 || reply.len() >= MAX_REPLY;
                }
                // A reset after a complete reply (an error, then close) still decides.
                Err(e) if start > 0 => {
                    reply.truncate(start);
                    if let Step::Done { verdict, .. } = exchange.step(reply, true) {
                        if verdict.up {
                            return Ok((verdict, stream, Vec::new(), false));
                        }
                        return Err(Failure::Backend(format!("{} (then {})", verdict.reason, describe(&e))));
                    }
                }
                Err(e) => return Err(Failure::Backend(format!("read failed: {}", describe(&e)))),
            }
        }
        match exchange.step(reply, ended) {
            Step::Read => {}
            Step::Send(bytes) => {
                stream
                    .write_all(&bytes)
                    .await
                    .map_err(|e| format!("send failed: {}", describe(&e)))?;
                reply.clear();
            }
            Step::Done {
                verdict,
                farewell,
                await_close,
            } => return Ok((verdict, stream, farewell, await_close)),
        }
    }
}

/// Sends the protocol's goodbye and, when the server closes next, reads (and drops)
/// what is left until it does: the server ends the session as a normal disconnect,
/// with nothing unread on either side (an unread byte at close makes a reset).
async fn goodbye(stream: &mut tokio::net::TcpStream, farewell: &[u8], await_close: bool) {
    if !farewell.is_empty() && stream.write_all(farewell).await.is_err() {
        return;
    }
    if !await_close {
        return;
    }
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < MAX_REPLY {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// A socket or connect error: ringlb's own shortage, or the backend's
/// answer ([`crate::errno::connect_blame`], the data path's rule too).
fn classify(e: &std::io::Error) -> Failure {
    use crate::errno::{connect_blame, ConnectBlame};
    match e.raw_os_error().map(connect_blame) {
        Some(ConnectBlame::OutOfResources | ConnectBlame::NoLocalAddress) => {
            Failure::Local(format!("not run: {e} (in ringlb, not the backend)"))
        }
        Some(ConnectBlame::Backend) | None => Failure::Backend(describe(e)),
    }
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => e.to_string(),
    }
}

/// Sends one probe datagram and expects a reply that starts with `expect`.
/// ICMP port unreachable shows up as "connection refused" on the connected
/// socket.
async fn check_udp(target: SocketAddr, send: &[u8], expect: &[u8]) -> Result<(), Failure> {
    let local = crate::sockaddr::udp_local_for(target);
    let socket = tokio::net::UdpSocket::bind(local).await.map_err(|e| classify(&e))?;
    socket.connect(target).await.map_err(|e| classify(&e))?;
    socket
        .send(send)
        .await
        .map_err(|e| format!("send failed: {}", describe(&e)))?;
    let mut buf = vec![0u8; 65536];
    let n = socket.recv(&mut buf).await.map_err(|e| describe(&e))?;
    if buf[..n].starts_with(expect) {
        Ok(())
    } else {
        Err(Failure::Backend(format!(
            "reply {:?} does not start with {:?}",
            String::from_utf8_lossy(&buf[..n.min(64)]),
            String::from_utf8_lossy(expect)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_in_ringlb_are_not_the_backends_fault() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(classify(&e), Failure::Local(d) if d.starts_with("not run")),
                "{e}"
            );
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(matches!(classify(&e), Failure::Backend(_)), "{e}");
        }
    }

    #[tokio::test]
    async fn a_refused_check_fails_and_an_answered_one_passes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let timeout = Duration::from_secs(2);
        let verdict = run_check(listener.local_addr().unwrap(), &CheckKind::Tcp, timeout)
            .await
            .0;
        assert_eq!(verdict, CheckVerdict::Passed);
        // Bound and never listening, held for the test: connect is refused.
        let refusing = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        refusing
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = refusing.local_addr().unwrap().as_socket().unwrap();
        let (verdict, _, detail) = run_check(addr, &CheckKind::Tcp, timeout).await;
        assert_eq!(verdict, CheckVerdict::Failed, "{detail}");
        assert_eq!(detail, "connection refused");
    }
}
