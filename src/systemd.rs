//! systemd's notify protocol (`Type=notify`): datagrams to `$NOTIFY_SOCKET`, no C library.
//!
//! The protocol is one Unix datagram per state change, newline-separated
//! `KEY=VALUE` lines (sd_notify(3)). `$NOTIFY_SOCKET` is a path, or an
//! abstract socket name written with a leading `@`. Without the variable
//! every call is a no-op costing one environment look-up at start (the
//! socket is opened once and kept), so a ringlb outside systemd pays nothing.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

/// The notify socket, opened on first use; `None` without `$NOTIFY_SOCKET`.
struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
}

fn notifier() -> Option<&'static Notifier> {
    static N: OnceLock<Option<Notifier>> = OnceLock::new();
    N.get_or_init(|| {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = path.as_bytes();
        let target = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&path)),
        };
        let made = target.and_then(|target| {
            let socket = UnixDatagram::unbound()?;
            // systemd reads its socket promptly; a stuck one must not stop a reload.
            socket.set_write_timeout(Some(Duration::from_secs(1)))?;
            Ok(Notifier { socket, target })
        });
        match made {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET {}: {e}; systemd is not notified", path.to_string_lossy());
                None
            }
        }
    })
    .as_ref()
}

/// Sends `state` (lines such as `READY=1`) to systemd, if it asked for
/// notifications. A failure is logged at debug only: the service manager
/// going away is no reason for the data plane to care.
pub fn notify(state: &str) {
    let Some(n) = notifier() else { return };
    if let Err(e) = n.socket.send_to_addr(state.as_bytes(), &n.target) {
        log::debug!("systemd notify {state:?}: {e}");
    }
}

/// `READY=1`: serving (after start, after a reload, and from the new process
/// of an upgrade, with its `MAINPID`).
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// `RELOADING=1` with `MONOTONIC_USEC` (CLOCK_MONOTONIC, as systemd needs to
/// tell this reload from an earlier one); `READY=1` must follow.
pub fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// `STOPPING=1`: stopped accepting, finishing open connections.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping: finishing open connections");
}

/// `MAINPID=` this process and `READY=1`: the new process of an upgrade
/// (`--takeover`) becomes the service's main process.
pub fn main_pid_ready(status: &str) {
    notify(&format!("MAINPID={}\nREADY=1\nSTATUS={status}", std::process::id()));
}

/// CLOCK_MONOTONIC in microseconds.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
