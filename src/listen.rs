//! Listening sockets: one SO_REUSEPORT socket per worker, built with socket2.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Fails with `AddrInUse` when another process already listens on `addr`.
///
/// SO_REUSEPORT would let a second process (same user) share the port
/// silently. A probe socket with SO_REUSEADDR but without SO_REUSEPORT binds
/// over TIME_WAIT leftovers, but not over a live listener, which is exactly
/// the distinction wanted.
pub fn check_tcp_address_free(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

/// Longest a start waits for sockets that no process holds any more to go.
///
/// A process that has just exited (kill -9, or a graceful stop) can leave
/// its listening sockets in LISTEN for a while: io_uring tears its ring
/// down asynchronously, and the ring's pending accepts hold the sockets
/// until then. Such a socket is in no process's descriptor table, which is
/// how it is told from a live listener of another process (that one fails
/// at once).
const ORPHAN_WAIT: Duration = Duration::from_secs(2);

/// Runs `probe` until it stops failing with `AddrInUse`, for as long as no
/// live process holds a socket on `addr`'s port (up to [`ORPHAN_WAIT`]).
/// The error is the probe's, with the live holder when one is known.
fn probe_until_orphans_gone(
    addr: SocketAddr,
    proto: &str,
    probe: impl Fn() -> io::Result<()>,
) -> Result<(), (io::Error, Option<String>)> {
    let deadline = Instant::now() + ORPHAN_WAIT;
    loop {
        match probe() {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let holder = live_holder(addr, proto);
                if holder.is_some() || Instant::now() >= deadline {
                    return Err((e, holder));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err((e, None)),
            Ok(()) => return Ok(()),
        }
    }
}

/// A process that holds a socket (`proto` = "tcp" or "udp") on a local
/// address that conflicts with `addr`: "pid N (comm)", from
/// /proc/net/{proto,proto6} (socket inodes) and /proc/*/fd. `None` when no
/// process does, or when it cannot be seen (another user's process without
/// the rights to look): the caller then waits for at most [`ORPHAN_WAIT`].
fn live_holder(addr: SocketAddr, proto: &str) -> Option<String> {
    let mut inodes = std::collections::HashSet::new();
    for file in [format!("/proc/net/{proto}"), format!("/proc/net/{proto}6")] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (f.get(1), f.get(9)) else {
                continue;
            };
            match (parse_proc_addr(local), inode.parse::<u64>()) {
                (Some(l), Ok(inode)) if inode != 0 && conflicts(l, addr) => {
                    inodes.insert(format!("socket:[{inode}]"));
                }
                _ => {}
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = proc_entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_str().is_some_and(|t| inodes.contains(t))) {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

/// Whether a socket bound to `local` is in the way of binding `addr`: the
/// same port, and the same address or a wildcard on either side (`::` may
/// be dual-stack, so it is in the way of IPv4 too).
fn conflicts(local: SocketAddr, addr: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (l, a) = (canon(local.ip()), canon(addr.ip()));
    local.port() == addr.port() && (l == a || l.is_unspecified() || a.is_unspecified())
}

/// Parses a /proc/net/{tcp,udp}[6] address: hex words of the address as
/// the kernel stores it (network order, printed as native-endian u32s),
/// a colon, the port in hex.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The refusal of a listener whose address is taken.
fn in_use(name: &str, what: &str, addr: SocketAddr, holder: Option<String>) -> String {
    let by = holder.map_or(String::new(), |h| format!(" ({h})"));
    format!("listener \"{name}\": {what}{addr} is already in use by another process{by}")
}

/// A listening TCP socket for one worker.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds `count` sockets for a listener, after checking that no other process
/// holds the address. The error names the address and says what to do.
///
/// `ours`: this ringlb's own listener holds the address (a reload moves or
/// renames listeners). The probe would only find ringlb itself, so it is
/// skipped: the new SO_REUSEPORT sockets join ringlb's own, which the
/// reload then retires.
pub fn bind_tcp_for_workers(
    name: &str,
    addr: SocketAddr,
    backlog: u32,
    count: usize,
    ours: bool,
) -> Result<Vec<std::net::TcpListener>, String> {
    if !ours {
        probe_until_orphans_gone(addr, "tcp", || check_tcp_address_free(addr)).map_err(|(e, holder)| {
            match e.kind() {
                io::ErrorKind::AddrInUse => in_use(name, "", addr, holder),
                _ => format!("listener \"{name}\": cannot bind {addr}: {e}"),
            }
        })?;
    }
    (0..count)
        .map(|_| bind_tcp(addr, backlog).map_err(|e| format!("listener \"{name}\": cannot bind {addr}: {e}")))
        .collect()
}

/// Binds `count` SO_REUSEPORT UDP sockets for a listener, after checking that
/// no other process holds the address (a probe bound without SO_REUSEADDR or
/// SO_REUSEPORT fails if anyone has it). `ours` as for [`bind_tcp_for_workers`].
pub fn bind_udp_for_workers(
    name: &str,
    addr: SocketAddr,
    count: usize,
    ours: bool,
) -> Result<Vec<std::net::UdpSocket>, String> {
    let probe = || -> io::Result<()> {
        let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        probe.bind(&addr.into())
    };
    if !ours {
        probe_until_orphans_gone(addr, "udp", probe).map_err(|(e, holder)| match e.kind() {
            io::ErrorKind::AddrInUse => in_use(name, "udp ", addr, holder),
            _ => format!("listener \"{name}\": cannot bind udp {addr}: {e}"),
        })?;
    }
    (0..count)
        .map(|_| {
            let bind = || -> io::Result<std::net::UdpSocket> {
                let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
                socket.set_reuse_port(true)?;
                if addr.is_ipv6() {
                    socket.set_only_v6(true)?;
                }
                // Bursts of client datagrams queue here while a worker is busy.
                let _ = socket.set_recv_buffer_size(4 << 20);
                socket.bind(&addr.into())?;
                Ok(socket.into())
            };
            bind().map_err(|e| format!("listener \"{name}\": cannot bind udp {addr}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_an_address_another_socket_listens_on() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        let err = bind_tcp_for_workers("web", addr, 16, 2, false).unwrap_err();
        assert!(err.contains("already in use by another process"), "{err}");
        assert!(
            err.contains(&format!("(pid {}", std::process::id())),
            "names the holder: {err}"
        );
        drop(other);
        assert_eq!(bind_tcp_for_workers("web", addr, 16, 2, false).unwrap().len(), 2);
    }

    #[test]
    fn parses_proc_net_addresses() {
        let v4 = format!("{:08X}:1F90", u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(parse_proc_addr(&v4), Some("127.0.0.1:8080".parse().unwrap()));
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        let v6 = format!("000000000000000000000000{one:08X}:0050");
        assert_eq!(parse_proc_addr(&v6), Some("[::1]:80".parse().unwrap()));
        assert!(conflicts(
            "0.0.0.0:80".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap()
        ));
        assert!(conflicts("[::]:80".parse().unwrap(), "127.0.0.1:80".parse().unwrap()));
        assert!(!conflicts(
            "127.0.0.2:80".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap()
        ));
    }
}
