//! The Unix control socket: owner-only, one JSON request per line.
//!
//! Bounded everywhere: at most [`MAX_CLIENTS`] clients at once (more are told
//! so and closed), a request line is at most [`MAX_LINE`] bytes, and a client
//! that sends nothing for [`IDLE_TIMEOUT`], or reads none of its reply for
//! [`WRITE_STALL`], is closed. Each client runs in its
//! own task, so a slow one never holds up another, and the data plane never
//! runs here at all.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::fd_reserve::FdReserve;
use crate::protocol::{error_line, parse_request};
use crate::server::Server;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Control clients served at once.
pub const MAX_CLIENTS: usize = 32;
/// A client that sends no complete line for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that reads none of its reply for this long is closed.
pub const WRITE_STALL: Duration = Duration::from_secs(5);
/// Descriptors kept back so control clients are served when the data plane
/// has used all the others.
const RESERVED_FDS: usize = 2;

/// Creates the control socket with mode 0600. A stale socket file from a
/// crashed run is replaced; a live one (another ringlb answering) is an error.
pub fn bind_control_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "control socket {} is in use by a running ringlb; stop it or set another [control] socket",
                    path.display()
                ))
            }
            Err(_) => {
                std::fs::remove_file(path)
                    .map_err(|e| format!("removing stale control socket {}: {e}", path.display()))?;
                log::info!("replaced stale control socket {}", path.display());
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    // The umask closes the window between bind and chmod in which another
    // user could connect. Called at start, before worker threads exist.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("control socket {}: chmod 0600: {e}", path.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(listener)
}

/// Creates the control socket for a process that takes over from the
/// running ringlb (`run --takeover`): bound beside `path` under a temporary
/// name, so the running process stays reachable at `path` until
/// [`install_control_socket`] moves this one there, once it serves. A
/// start that fails before then leaves `ctl` talking to the old process.
/// Returns the socket and its temporary path (`path` itself when the
/// temporary name would not fit a Unix socket path: then it is replaced at once).
pub fn bind_control_socket_beside(path: &Path) -> Result<(std::os::unix::net::UnixListener, PathBuf), String> {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}", std::process::id()));
    let temp = path.with_file_name(name);
    if temp.as_os_str().len() <= 107 {
        let _ = std::fs::remove_file(&temp);
        return Ok((bind_control_socket(&temp)?, temp));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("control socket {}: removing the old one: {e}", path.display())),
    }
    Ok((bind_control_socket(path)?, path.to_path_buf()))
}

/// Moves a socket bound by [`bind_control_socket_beside`] to `path`
/// (rename: atomic, so `ctl` finds one process or the other, never none).
pub fn install_control_socket(temp: &Path, path: &Path) -> Result<(), String> {
    if temp == path {
        return Ok(());
    }
    std::fs::rename(temp, path).map_err(|e| {
        let _ = std::fs::remove_file(temp);
        format!(
            "control socket {}: moving {} there: {e}",
            path.display(),
            temp.display()
        )
    })
}

/// Serves control clients until the process exits.
pub async fn serve(listener: std::os::unix::net::UnixListener, server: Arc<Server>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("control socket: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let reserve = Arc::new(FdReserve::new(RESERVED_FDS));
    loop {
        let mut stream = reserve.accept(listener.as_fd(), || listener.accept()).await.0;
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let server = server.clone();
                let reserve = reserve.clone();
                tokio::spawn(async move {
                    serve_client(stream, &server).await;
                    drop(permit);
                    reserve.refill();
                });
            }
            Err(_) => {
                let reply = format!(
                    "{}\n",
                    error_line(&format!("too many control clients (max {MAX_CLIENTS}); try again"))
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
            }
        }
    }
}

enum Line {
    Complete(String),
    TooLong,
    Eof,
}

async fn read_line_capped(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> std::io::Result<Line> {
    buf.clear();
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Complete(String::from_utf8_lossy(buf).into_owned())
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        buf.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if buf.len() > MAX_LINE {
            return Ok(Line::TooLong);
        }
        if done {
            return Ok(Line::Complete(String::from_utf8_lossy(buf).into_owned()));
        }
    }
}

async fn serve_client(stream: tokio::net::UnixStream, server: &Arc<Server>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(8192, read);
    let mut buf = Vec::new();
    loop {
        let (reply, close) = match tokio::time::timeout(IDLE_TIMEOUT, read_line_capped(&mut reader, &mut buf)).await {
            Err(_) | Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
            Ok(Ok(Line::TooLong)) => (error_line(&format!("request line longer than {MAX_LINE} bytes")), true),
            Ok(Ok(Line::Complete(line))) => match parse_request(&line) {
                Ok(crate::protocol::Request::Takeover { protocol, pid }) => {
                    // The connection is the handover's from here on.
                    super::takeover::serve(server, reader, write, protocol, pid).await;
                    return;
                }
                Ok(req) => (super::handle_line(server, req).await, false),
                Err(e) => (error_line(&e), false),
            },
        };
        let text = reply + "\n";
        let started = std::time::Instant::now();
        let written = write_reply(&mut write, text.as_bytes()).await;
        log::debug!(
            "control reply of {} bytes written in {:?}{}",
            text.len(),
            started.elapsed(),
            if written { "" } else { " (client gone or stalled: cut)" }
        );
        if !written || close {
            return;
        }
    }
}

/// Writes a whole reply, however large (`ctl backends` of 10,000 backends
/// is megabytes): the client is dropped only when a write makes no progress
/// for [`WRITE_STALL`], never for the total time, which a big reply on a
/// busy control thread may well exceed. A cut reply is a broken one (the
/// client cannot parse half a JSON line), so it is the last thing to do.
async fn write_reply(write: &mut tokio::net::unix::OwnedWriteHalf, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        match tokio::time::timeout(WRITE_STALL, write.write(buf)).await {
            Ok(Ok(n)) if n > 0 => buf = &buf[n..],
            _ => return false,
        }
    }
    true
}
