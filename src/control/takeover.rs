//! Socket handover for upgrades: `ringlb run --takeover` receives the running process's listening sockets (SCM_RIGHTS).
//!
//! The exchange, on one control-socket connection:
//!
//! 1. new → old: `{"cmd":"takeover","protocol":1,"pid":N}`
//! 2. old → new: one JSON line ([`Offer`]: the listeners, in order, each
//!    with its sockets, one per old worker, then the metrics listener) and
//!    the descriptors themselves as `SCM_RIGHTS`, at most
//!    [`FDS_PER_MESSAGE`] per message (the first message carries the line,
//!    each further one a single newline byte).
//! 3. The new process starts serving on them (no bind: the same sockets,
//!    their accept queues, SO_REUSEPORT groups and steering programs).
//! 4. new → old: `{"ready":true}`; old → new: `{"ok":true}`. The old
//!    process stops accepting at once, finishes its open connections within
//!    `shutdown_timeout`, and exits 0; meanwhile it writes one
//!    `{"draining":{...}}` line every [`STATUS_EVERY`] on the connection,
//!    which the new process shows in `ctl status`.
//!
//! Until step 4 the old process has changed nothing: a new process that
//! fails its checks, cannot use the sockets, dies, or says nothing within
//! [`READY_TIMEOUT`], leaves it serving as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufReader as AsyncBufReader};

use crate::protocol::PredecessorStatus;
use crate::server::Server;

/// One drain report of the old process: `{"draining": {...}}`.
#[derive(Serialize, Deserialize)]
struct Draining {
    draining: PredecessorStatus,
}

/// The handover protocol this build speaks (old and new must agree).
pub const PROTOCOL: u32 = 1;
/// Most descriptors one handover carries (listeners × workers + metrics).
pub const MAX_FDS: usize = 4096;
/// Descriptors per message (the kernel's limit, SCM_MAX_FD, is 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// How long the old process waits for the new one to serve.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new process waits on each step of the exchange.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the old process reports its draining to the new one.
pub const STATUS_EVERY: Duration = Duration::from_millis(500);
/// Longest line read on either side.
const MAX_LINE: u64 = 1 << 20;

/// Step 4, new → old: `{"ready":true}`, this process serves now.
#[derive(Debug, Serialize, Deserialize)]
struct Ready {
    ready: bool,
}

/// Step 4, old → new: `{"ok":true}`, let go. Also how the new process reads
/// the head of the offer line, which may be a refusal (`{"ok":false,"error":...}`).
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One message of the exchange as a line.
fn line_of(message: &impl Serialize) -> String {
    format!(
        "{}\n",
        serde_json::to_string(message).expect("a plain struct serializes")
    )
}

/// What the old process hands over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    /// Always true (an error reply has `ok: false` and `error`).
    pub ok: bool,
    /// The old process's id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Its handover protocol.
    pub protocol: u32,
    /// Its config generation.
    pub config_generation: u64,
    /// Its listeners, in the order their descriptors follow.
    pub listeners: Vec<OfferedListener>,
    /// Its metrics listener's address; its descriptor comes last.
    pub metrics: Option<SocketAddr>,
    /// Descriptors that follow the line.
    pub fds: usize,
}

/// One listener of an [`Offer`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferedListener {
    /// Its name in the old config.
    pub name: String,
    /// Address.
    pub bind: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Descriptors (one per old worker).
    pub sockets: usize,
}

// === the old process ===

/// Serves a `takeover` request on a control connection (the old process's
/// side): hands the sockets over, waits for the new process to serve, then
/// has this process stop accepting and drain. Returns when the connection
/// is done with.
pub async fn serve(
    server: &Arc<Server>,
    mut reader: AsyncBufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    protocol: u32,
    pid: u32,
) {
    let refuse = |e: String| format!("{}\n", crate::protocol::error_line(&e));
    if protocol != PROTOCOL {
        let line = refuse(format!(
            "takeover protocol {protocol} is not the protocol {PROTOCOL} this ringlb {} speaks",
            env!("CARGO_PKG_VERSION")
        ));
        let _ = write.write_all(line.as_bytes()).await;
        return;
    }
    if server.takeover_busy.swap(true, Ordering::SeqCst) {
        let _ = write
            .write_all(refuse("a takeover is already in progress".into()).as_bytes())
            .await;
        return;
    }
    let (offer, fds) = offer(server);
    log::info!(
        "takeover: process {pid} asks for the listening sockets; handing over {} socket(s) of {} listener(s)",
        offer.fds,
        offer.listeners.len()
    );
    if let Err(e) = send_offer(&write, &offer, &fds).await {
        log::warn!("takeover by process {pid}: sending the sockets failed: {e}; serving on as before");
        server.takeover_busy.store(false, Ordering::SeqCst);
        return;
    }
    drop(fds);
    let mut buf = Vec::new();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        use tokio::io::AsyncBufReadExt;
        buf.clear();
        let mut limited = tokio::io::AsyncReadExt::take(&mut reader, MAX_LINE);
        limited.read_until(b'\n', &mut buf).await
    })
    .await;
    let line = String::from_utf8_lossy(&buf);
    let is_ready = serde_json::from_str::<Ready>(line.trim()).is_ok_and(|r| r.ready);
    if !matches!(ready, Ok(Ok(n)) if n > 0) || !is_ready {
        let why = match ready {
            Err(_) => format!("it did not report serving within {READY_TIMEOUT:?}"),
            Ok(Ok(0)) => "it closed the connection (failed or died during start)".into(),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(_)) => format!("unexpected message {:?}", line.trim()),
        };
        log::warn!("takeover by process {pid} failed: {why}; serving on as before");
        server.takeover_busy.store(false, Ordering::SeqCst);
        return;
    }
    let open = server.active_connections();
    log::info!(
        "takeover: process {pid} is serving; stopped accepting, finishing {open} open connection(s) (up to shutdown_timeout)"
    );
    server.handed_over.store(true, Ordering::SeqCst);
    server.shared.handed_over.store(true, Ordering::SeqCst);
    // The control socket's path and the metrics address are the new
    // process's now: stop serving them here.
    for task in server.endpoint_tasks.lock().drain(..) {
        task.abort();
    }
    server.handover.lock().clear();
    server.handover_done.notify_one();
    let let_go = line_of(&Answer { ok: true, error: None });
    if write.write_all(let_go.as_bytes()).await.is_err() {
        return;
    }
    // Report the drain to the new process until this one exits.
    let mut interval = tokio::time::interval(STATUS_EVERY);
    loop {
        interval.tick().await;
        // Read one after the other: both take the model lock.
        let config_generation = server.model.lock().config_generation;
        let open_connections = server.active_connections();
        let report = PredecessorStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            config_generation,
            open_connections,
        };
        let line = match serde_json::to_string(&Draining { draining: report }) {
            Ok(line) => format!("{line}\n"),
            Err(_) => return,
        };
        match tokio::time::timeout(Duration::from_secs(1), write.write_all(line.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// The offer line and the descriptors, duplicated from the ones the
/// control plane keeps for this purpose ([`Server::handover`]).
fn offer(server: &Server) -> (Offer, Vec<OwnedFd>) {
    let model = server.model.lock();
    let kept = server.handover.lock();
    let mut listeners = Vec::new();
    let mut fds = Vec::new();
    for l in model.listeners.iter().filter(|l| l.retire_deadline.is_none()) {
        let Some(sockets) = kept.get(&l.slot) else { continue };
        let dups: Vec<OwnedFd> = sockets.iter().filter_map(|s| s.try_clone().ok()).collect();
        if dups.len() != sockets.len() || fds.len() + dups.len() >= MAX_FDS {
            continue;
        }
        listeners.push(OfferedListener {
            name: l.config.name.clone(),
            bind: l.config.bind,
            protocol: protocol_name(l.config.protocol).into(),
            sockets: dups.len(),
        });
        fds.extend(dups);
    }
    let metrics = server
        .metrics_fd
        .lock()
        .as_ref()
        .and_then(|(addr, fd)| Some((*addr, fd.try_clone().ok()?)));
    let metrics_addr = metrics.as_ref().map(|(a, _)| *a);
    if let Some((_, fd)) = metrics {
        fds.push(fd);
    }
    let offer = Offer {
        ok: true,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL,
        config_generation: model.config_generation,
        listeners,
        metrics: metrics_addr,
        fds: fds.len(),
    };
    (offer, fds)
}

/// `tcp` / `udp`.
pub fn protocol_name(p: crate::config::Protocol) -> &'static str {
    match p {
        crate::config::Protocol::Tcp => "tcp",
        crate::config::Protocol::Udp => "udp",
    }
}

async fn send_offer(write: &tokio::net::unix::OwnedWriteHalf, offer: &Offer, fds: &[OwnedFd]) -> std::io::Result<()> {
    let line = format!("{}\n", serde_json::to_string(offer).map_err(std::io::Error::other)?);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut chunks: Vec<(&[u8], &[RawFd])> = vec![(line.as_bytes(), &raw[..raw.len().min(FDS_PER_MESSAGE)])];
    let mut rest = &raw[raw.len().min(FDS_PER_MESSAGE)..];
    while !rest.is_empty() {
        let n = rest.len().min(FDS_PER_MESSAGE);
        chunks.push((b"\n", &rest[..n]));
        rest = &rest[n..];
    }
    let stream: &tokio::net::UnixStream = write.as_ref();
    for (data, fds) in chunks {
        let mut sent = 0;
        while sent < data.len() {
            stream.writable().await?;
            let with = if sent == 0 { fds } else { &[][..] };
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fds(stream.as_fd(), &data[sent..], with)
            }) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// One `sendmsg` of `data` with `fds` as SCM_RIGHTS; the bytes sent.
fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes (8-aligned), enough for
        // one cmsghdr with `fds`; CMSG_FIRSTHDR is non-null for that buffer,
        // and the copy writes exactly fd_bytes into its data area.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), fd_bytes);
        }
    }
    // A signal (the other threads' timers, a SIGCHLD) may interrupt the
    // call before anything moved: try again, as the std wrappers do.
    loop {
        // SAFETY: msg and everything it points at live across the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recvmsg` into `buf`; descriptors received are appended to `fds`
/// (close-on-exec). A message whose descriptors were cut (MSG_CTRUNC) is an
/// error: the handover would be incomplete.
fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // Interrupted by a signal before anything arrived (EINTR): try again.
    // Without this, a takeover failed now and then with "Interrupted system
    // call" while the new process waited for the old one's answer.
    let n = loop {
        // SAFETY: msg points at live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros walk only within it. Each SCM_RIGHTS descriptor is new in this
    // process and owned by nobody else, so OwnedFd may take it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
    }
    Ok(n as usize)
}

// === SIGUSR2: the old process starts its successor ===

/// Starts `ringlb run -c CONFIG --takeover` from the binary now at this
/// process's path (the upgraded one: once the file is replaced, the kernel
/// reports the running image as "PATH (deleted)"), as a child of this
/// process: in a systemd service it then runs in the service's cgroup and
/// sandbox, with its `NOTIFY_SOCKET`, and becomes the main process by its
/// own `MAINPID=`. Its exit is logged if it fails; this process serves on.
pub fn spawn_successor(server: &Server) {
    let Some(config) = server.model.lock().config.source.clone() else {
        log::warn!("SIGUSR2: this ringlb runs an embedded config; no upgrade");
        return;
    };
    if server.takeover_busy.load(Ordering::SeqCst) {
        log::warn!("SIGUSR2: a takeover is already in progress");
        return;
    }
    let exe = match std::fs::read_link("/proc/self/exe") {
        Ok(p) => {
            let text = p.to_string_lossy();
            std::path::PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text).to_string())
        }
        Err(e) => {
            log::warn!("SIGUSR2: cannot tell this binary's path: {e}; no upgrade");
            return;
        }
    };
    let child = std::process::Command::new(&exe)
        .arg("run")
        .arg("-c")
        .arg(&config)
        .arg("--takeover")
        .stdin(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(mut child) => {
            let pid = child.id();
            log::info!(
                "SIGUSR2: started {} run -c {} --takeover as process {pid}",
                exe.display(),
                config.display()
            );
            // Reaps it if it fails (this process then serves on); if it
            // succeeds, this process exits first and it lives on.
            let _ = std::thread::Builder::new()
                .name("ringlb-successor".into())
                .spawn(move || match child.wait() {
                    Ok(status) if status.success() => {}
                    Ok(status) => log::warn!("upgrade: process {pid} exited ({status}); serving on as before"),
                    Err(e) => log::warn!("upgrade: waiting for process {pid}: {e}"),
                });
        }
        Err(e) => log::warn!("SIGUSR2: cannot start {}: {e}; serving on as before", exe.display()),
    }
}

// === the new process ===

/// What `run --takeover` received from the running process.
pub struct Inherited {
    /// The connection to the old process (kept for `ready` and its reports).
    stream: UnixStream,
    /// Its offer.
    pub offer: Offer,
    /// Listeners not yet taken, with their sockets.
    listeners: Vec<(OfferedListener, Vec<OwnedFd>)>,
    /// The metrics listener, if offered and not yet taken.
    metrics: Option<(SocketAddr, OwnedFd)>,
}

impl Inherited {
    /// Takes the sockets of the offered listener on `bind` / `protocol`.
    pub fn take_listener(&mut self, bind: SocketAddr, protocol: crate::config::Protocol) -> Option<Vec<OwnedFd>> {
        let i = self
            .listeners
            .iter()
            .position(|(l, _)| l.bind == bind && l.protocol == protocol_name(protocol))?;
        Some(self.listeners.remove(i).1)
    }

    /// Whether an offered listener's address overlaps `bind` (the new
    /// config moved or changed it): its port is ringlb's own.
    pub fn overlaps(&self, bind: SocketAddr, protocol: crate::config::Protocol) -> bool {
        self.listeners
            .iter()
            .any(|(l, _)| l.protocol == protocol_name(protocol) && crate::config::addresses_overlap(l.bind, bind))
    }

    /// Takes the metrics listener if it is on `addr`.
    pub fn take_metrics(&mut self, addr: SocketAddr) -> Option<OwnedFd> {
        match self.metrics.take() {
            Some((a, fd)) if a == addr => Some(fd),
            other => {
                self.metrics = other;
                None
            }
        }
    }

    /// Names of offered listeners not taken (the new config drops them).
    pub fn untaken(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|(l, _)| format!("\"{}\" ({} {})", l.name, l.protocol, l.bind))
            .collect()
    }

    /// Tells the old process this one serves, and waits for its answer:
    /// it stops accepting then. Returns the connection, on which the old
    /// process reports its drain.
    pub fn confirm(mut self) -> Result<BufReader<UnixStream>, String> {
        // The sockets this process did not take are closed here, before the
        // old process lets go of its own copies.
        self.listeners.clear();
        self.metrics = None;
        self.stream
            .write_all(line_of(&Ready { ready: true }).as_bytes())
            .map_err(|e| format!("telling process {} that this one serves: {e}", self.offer.pid))?;
        let mut reader = BufReader::new(self.stream);
        let mut line = String::new();
        (&mut reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| format!("waiting for process {} to let go: {e}", self.offer.pid))?;
        if serde_json::from_str::<Answer>(line.trim()).is_ok_and(|a| a.ok) {
            Ok(reader)
        } else {
            Err(format!("process {} answered {:?}", self.offer.pid, line.trim()))
        }
    }
}

/// Asks the ringlb on control socket `path` for its sockets (the new
/// process's side). Every failure names what went wrong; the old process
/// is left as it was.
pub fn request(path: &Path) -> Result<Inherited, String> {
    let shown = path.display();
    let stream = UnixStream::connect(path)
        .map_err(|e| format!("--takeover: no ringlb answers on control socket {shown}: {e}"))?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let request = crate::protocol::Request::Takeover {
        protocol: PROTOCOL,
        pid: std::process::id(),
    };
    (&stream)
        .write_all(format!("{}\n", request.to_line()).as_bytes())
        .map_err(|e| format!("--takeover: writing to {shown}: {e}"))?;
    // Read with recvmsg only: a plain read would drop the descriptors.
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let offer: Offer = loop {
        let n = recv_with_fds(stream.as_fd(), &mut buf, &mut fds)
            .map_err(|e| format!("--takeover: reading the answer of {shown}: {e}"))?;
        if n == 0 {
            return Err(format!("--takeover: {shown} closed the connection without an answer"));
        }
        bytes.extend_from_slice(&buf[..n]);
        if bytes.len() as u64 > MAX_LINE {
            return Err(format!("--takeover: {shown} sent an answer over {MAX_LINE} bytes"));
        }
        if let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&bytes[..end]).into_owned();
            let head: Answer =
                serde_json::from_str(&line).map_err(|e| format!("--takeover: {shown} answered {line:?}: {e}"))?;
            if !head.ok {
                return Err(format!(
                    "--takeover: the running ringlb refused: {}",
                    head.error.as_deref().unwrap_or(&line)
                ));
            }
            break serde_json::from_str(&line).map_err(|e| {
                format!("--takeover: the running ringlb's answer is not one this version understands ({e}): {line}")
            })?;
        }
    };
    if offer.protocol != PROTOCOL || offer.fds > MAX_FDS {
        return Err(format!(
            "--takeover: the running ringlb {} offers protocol {} with {} descriptors; this one speaks {PROTOCOL}",
            offer.version, offer.protocol, offer.fds
        ));
    }
    while fds.len() < offer.fds {
        let n = recv_with_fds(stream.as_fd(), &mut buf, &mut fds)
            .map_err(|e| format!("--takeover: receiving sockets from {shown}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "--takeover: {shown} closed after {} of {} sockets",
                fds.len(),
                offer.fds
            ));
        }
    }
    if fds.len() != offer.fds {
        return Err(format!(
            "--takeover: got {} sockets, {} announced",
            fds.len(),
            offer.fds
        ));
    }
    let mut fds = fds.into_iter();
    let listeners = offer
        .listeners
        .iter()
        .map(|l| (l.clone(), fds.by_ref().take(l.sockets).collect::<Vec<_>>()))
        .collect();
    let metrics = offer.metrics.zip(fds.next());
    // Writes to the old process from now on (ready) get the step timeout; its
    // reports after that come at STATUS_EVERY.
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(Inherited {
        stream,
        offer,
        listeners,
        metrics,
    })
}

/// Checks that `fd` is a socket of `kind` (SOCK_STREAM / SOCK_DGRAM)
/// bound to `bind`: a handed-over descriptor is used only for what it is.
pub fn check_socket(fd: &OwnedFd, kind: socket2::Type, bind: SocketAddr) -> Result<(), String> {
    let sock = socket2::SockRef::from(fd);
    let ty = sock.r#type().map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?.as_socket();
    if ty != kind || local != Some(bind) {
        return Err(format!(
            "a handed-over socket is {ty:?} on {local:?}, not {kind:?} on {bind}"
        ));
    }
    Ok(())
}

/// Reads the old process's drain reports until it exits, keeping the last
/// one in `into` (shown by `ctl status` as `predecessor`; cleared on exit).
pub fn watch_predecessor(mut reader: BufReader<UnixStream>, into: Arc<parking_lot::Mutex<Option<PredecessorStatus>>>) {
    let _ = reader.get_ref().set_read_timeout(Some(Duration::from_secs(5)));
    std::thread::Builder::new()
        .name("ringlb-takeover".into())
        .spawn(move || loop {
            let mut line = String::new();
            match (&mut reader).take(MAX_LINE).read_line(&mut line) {
                Ok(n) if n > 0 => {
                    if let Ok(Draining { draining }) = serde_json::from_str::<Draining>(line.trim()) {
                        *into.lock() = Some(draining);
                    }
                }
                // EOF (it exited), an error, or 5 s of silence (it hung):
                // no longer shown.
                _ => {
                    if let Some(last) = into.lock().take() {
                        log::info!("takeover: the previous process ({}) has exited", last.pid);
                    }
                    return;
                }
            }
        })
        .map(|_| ())
        .unwrap_or_else(|e| log::warn!("takeover: cannot watch the previous process: {e}"));
}
