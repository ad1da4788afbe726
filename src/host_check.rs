//! Checks a validated config against this host before start (`ringlb
//! check` and `run`): addresses, the control socket's path, the state file,
//! io_uring. Start-up's, not config's: validation stays pure, and config
//! imports nothing of the data plane.

use std::net::SocketAddr;
use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors, Protocol, SourceMode};

/// What can be known about this host without starting anything, for
/// `check` and `run` (after [`Config::load`]): every listener and the
/// metrics endpoint on an address this host has, the control socket
/// path usable (short enough, not some other file, its directory there
/// or creatable), and io_uring available when `io_engine = "uring"`.
/// Nothing is bound, created or kept. Ports are not probed: the running
/// ringlb a config is checked for usually holds them.
pub fn check_host(config: &Config) -> Result<(), ConfigErrors> {
    let file = config.source.as_deref().unwrap_or(Path::new("<embedded>"));
    let mut errors = Vec::new();
    let mut err = |place: String, problem: String| errors.push(ConfigError::new(file, place, problem));
    for l in &config.listeners {
        let ty = match l.protocol {
            Protocol::Tcp => socket2::Type::STREAM,
            Protocol::Udp => socket2::Type::DGRAM,
        };
        if let Err(e) = address_is_local(l.bind, ty) {
            err(
                format!("listener \"{}\": bind", l.name),
                format!("{}: cannot bind here: {e}", l.bind),
            );
        }
        if l.source == SourceMode::Client {
            if let Err(problem) = crate::transparent::probe() {
                err(format!("listener \"{}\": source", l.name), problem);
            }
        }
    }
    if let Some(m) = config.control.metrics {
        if let Err(e) = address_is_local(m, socket2::Type::STREAM) {
            err("control.metrics".into(), format!("{m}: cannot bind here: {e}"));
        }
    }
    if let Some(path) = &config.control.socket {
        if let Err(problem) = control_socket_usable(path) {
            err("control.socket".into(), problem);
        }
    }
    if let Some(path) = &config.control.state_file {
        if let Err(problem) = crate::state_file::usable(path) {
            err("control.state_file".into(), problem);
        }
    }
    if let Err(e) = crate::engine::resolve_engine(config.runtime.io_engine) {
        err("runtime.io_engine".into(), e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Binds a throwaway socket to `addr`'s IP on an ephemeral port: fails
/// (EADDRNOTAVAIL) when this host does not have the address, whoever holds
/// the port itself.
fn address_is_local(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.bind(&SocketAddr::new(addr.ip(), 0).into())
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

/// Whether ringlb could create its control socket at `path` at start.
fn control_socket_usable(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().len() > MAX_UNIX_PATH {
        return Err(format!(
            "longer than the {MAX_UNIX_PATH} bytes a Unix socket path may have: {}",
            path.display()
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // A stale socket is replaced at start; anything else would be deleted.
        return if meta.file_type().is_socket() {
            Ok(())
        } else {
            Err(format!(
                "{}: exists and is not a socket (ringlb only replaces a stale socket)",
                path.display()
            ))
        };
    }
    // The directory is created at start when missing: the nearest existing
    // ancestor must be a directory ringlb can create entries in.
    let mut dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    loop {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(format!("{}: not a directory", dir.display())),
            Err(_) => match dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(up) => dir = up,
                None => return Ok(()),
            },
        }
    }
    let c_dir =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: access() with a valid NUL-terminated path.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!(
            "{}: cannot create the socket there: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
