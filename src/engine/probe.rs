//! Decides the io engine at start: probes io_uring and explains why it is missing.

use crate::config::IoEngineChoice;
use crate::worker::IoEngine;

/// Tries to set up a small io_uring; `Err` says why it can't be used here.
pub fn probe_io_uring() -> Result<(), String> {
    if std::env::var_os("RINGLB_DISABLE_IO_URING").is_some() {
        return Err("RINGLB_DISABLE_IO_URING is set".into());
    }
    // io_uring_params is 120 bytes on every architecture; zeroed = defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup writes into params, which is large enough.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us and is closed once.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
    let why = match (err.raw_os_error(), sysctl.as_deref().map(str::trim)) {
        (_, Some("2")) => "kernel.io_uring_disabled = 2 (io_uring is off on this host)".to_string(),
        (Some(libc::EPERM), Some("1")) => {
            "kernel.io_uring_disabled = 1 and this process is not in io_uring_group".to_string()
        }
        (Some(libc::EPERM), _) => {
            "io_uring_setup is blocked (EPERM: a seccomp profile, e.g. Docker's or containerd's default)".to_string()
        }
        (Some(libc::ENOSYS), _) => {
            "io_uring_setup is not available (ENOSYS: kernel too old or built without io_uring)".to_string()
        }
        _ => format!("io_uring_setup failed: {err}"),
    };
    Err(why)
}

/// Resolves the configured choice into the engine to run, or an error for
/// `uring` when io_uring can't be set up. `auto` falls back to epoll and
/// returns the reason so the caller logs it once.
pub fn resolve_engine(choice: IoEngineChoice) -> Result<(IoEngine, Option<String>), String> {
    match choice {
        IoEngineChoice::Epoll => Ok((IoEngine::Epoll, None)),
        IoEngineChoice::Uring => match probe_io_uring() {
            Ok(()) => Ok((IoEngine::Uring, None)),
            Err(why) => Err(format!("io_engine = \"uring\" but io_uring is unavailable: {why}")),
        },
        IoEngineChoice::Auto => match probe_io_uring() {
            Ok(()) => Ok((IoEngine::Uring, None)),
            Err(why) => Ok((IoEngine::Epoll, Some(why))),
        },
    }
}
