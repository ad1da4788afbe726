//! One active health check: connect, optionally send, expect a reply prefix.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::CheckKind;

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
