//! One active health check: connect, optionally send, expect a reply prefix.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::CheckKind;

/// Runs one check within `timeout`; returns ok, latency, and a detail for logs.
pub async fn run_check(target: SocketAddr, kind: &CheckKind, timeout: Duration) -> (bool, Duration, String) {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, check(target, kind)).await;
    let latency = started.elapsed();
    match result {
        Ok(Ok(())) => (true, latency, "ok".into()),
        Ok(Err(detail)) => (false, latency, detail),
        Err(_) => (false, latency, format!("timed out after {timeout:?}")),
    }
}

async fn check(target: SocketAddr, kind: &CheckKind) -> Result<(), String> {
    if let CheckKind::UdpSendExpect { send, expect } = kind {
        return check_udp(target, send, expect).await;
    }
    // The stream is dropped (closed) on every path, including the timeout
    // above, because this runs on tokio's reactor where drop cancels.
    let mut stream = tokio::net::TcpStream::connect(target).await.map_err(|e| describe(&e))?;
    let CheckKind::SendExpect { send, expect } = kind else {
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
            return Err(format!(
                "closed after {filled} byte(s) of reply, expected {:?}",
                String::from_utf8_lossy(expect)
            ));
        }
        if got[filled..filled + n] != expect[filled..filled + n] {
            filled += n;
            return Err(format!(
                "reply {:?} does not start with {:?}",
                String::from_utf8_lossy(&got[..filled]),
                String::from_utf8_lossy(expect)
            ));
        }
        filled += n;
    }
    Ok(())
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
async fn check_udp(target: SocketAddr, send: &[u8], expect: &[u8]) -> Result<(), String> {
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await.map_err(|e| describe(&e))?;
    socket.connect(target).await.map_err(|e| describe(&e))?;
    socket
        .send(send)
        .await
        .map_err(|e| format!("send failed: {}", describe(&e)))?;
    let mut buf = vec![0u8; 65536];
    let n = socket.recv(&mut buf).await.map_err(|e| describe(&e))?;
    if buf[..n].starts_with(expect) {
        Ok(())
    } else {
        Err(format!(
            "reply {:?} does not start with {:?}",
            String::from_utf8_lossy(&buf[..n.min(64)]),
            String::from_utf8_lossy(expect)
        ))
    }
}
