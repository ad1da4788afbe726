//! Test harness: the real `ringlb` binary, real loopback sockets, and small
//! backends that behave (or misbehave) on purpose.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test: this build's, or `RINGLB_TEST_BIN` (to run a
/// test against another build, e.g. one from before a fix).
pub fn ringlb_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| std::env::var("RINGLB_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringlb").to_string()))
}

/// A port for a ringlb listener: free for TCP and UDP on 127.0.0.1 and ::1
/// right now, and outside the kernel's ephemeral range, so no client socket
/// of a test running alongside can be handed it between this call and
/// ringlb's bind. Successive calls in one test binary never repeat.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (low, span) = listen_port_range();
    // Test binaries run one after another in CI; a pid-derived start keeps two
    // that run at once (a developer's loop) apart as well.
    let base = std::process::id() as usize * 7919;
    loop {
        let port = (low as usize + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % span as usize) as u16;
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && !matches!(TcpListener::bind(("::1", port)), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse);
        if free {
            return port;
        }
    }
}

/// Ports below (or, failing room there, above) the ephemeral range:
/// `(first, count)`.
fn listen_port_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|w| w.parse::<u16>().ok());
    let (eph_low, eph_high) = (it.next().unwrap_or(32768), it.next().unwrap_or(60999));
    if eph_low >= 15_000 {
        (10_000, eph_low - 10_000)
    } else {
        (eph_high + 1, u16::MAX - eph_high)
    }
}

/// A TCP address that refuses connections for as long as the returned socket
/// lives: the port is bound (so nobody else can take it) but not listening.
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    (sock, addr)
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ringlb-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ringlb run`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Ringlb {
    pub child: Child,
    pub dir: TempDir,
    pub config: PathBuf,
    /// Where its stderr goes, when started with [`Ringlb::start_logged`].
    pub log: Option<PathBuf>,
}

impl Ringlb {
    /// Writes `config` and starts ringlb; waits until `wait_for` accepts.
    pub fn start(config: &str, wait_for: SocketAddr) -> Ringlb {
        Self::start_with(config, wait_for, &[])
    }

    pub fn start_with(config: &str, wait_for: SocketAddr, env: &[(&str, &str)]) -> Ringlb {
        Self::start_inner(config, wait_for, env, false)
    }

    /// Like [`Ringlb::start_with`], with stderr (the log) to a file: see
    /// [`Ringlb::log_text`].
    pub fn start_logged(config: &str, wait_for: SocketAddr, env: &[(&str, &str)]) -> Ringlb {
        Self::start_inner(config, wait_for, env, true)
    }

    /// The log so far (empty unless started with [`Ringlb::start_logged`]).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    fn start_inner(config: &str, wait_for: SocketAddr, env: &[(&str, &str)], logged: bool) -> Ringlb {
        let dir = TempDir::new("lb");
        let path = dir.file("ringlb.toml", config);
        let mut cmd = Command::new(ringlb_bin());
        cmd.arg("run").arg("-c").arg(&path).stdin(Stdio::null());
        let log = logged.then(|| dir.0.join("ringlb.log"));
        if let Some(log) = &log {
            cmd.stderr(std::fs::File::create(log).expect("create the log file"));
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ringlb");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ringlb exited at start: {status}");
            }
            if is_listening(wait_for) {
                break;
            }
            if Instant::now() >= deadline {
                // Not left running (and holding the test's stdout) after the panic.
                let _ = child.kill();
                let _ = child.wait();
                panic!("ringlb did not listen on {wait_for} within 10s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ringlb {
            child,
            dir,
            config: path,
            log,
        }
    }

    /// Waits until `addr` is listening (without sending a connection through).
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(addr) {
            assert!(Instant::now() < deadline, "{addr} not listening within 10s");
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for exit up to `timeout`; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Ringlb {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(3)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Whether some socket listens on `addr` (read from /proc/net/tcp*, so that
/// waiting for ringlb sends no connection through it to a backend).
pub fn is_listening(addr: SocketAddr) -> bool {
    let port = format!(":{:04X} ", addr.port());
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).unwrap_or_default().lines().any(|l| {
            l.split_whitespace().nth(3) == Some("0A")
                && l.contains(&port)
                && l.split_whitespace().nth(1).is_some_and(|a| a.ends_with(port.trim()))
        })
    })
}

/// Runs `ringlb ARGS...` to completion.
pub fn ringlb_cmd(args: &[&str]) -> Output {
    Command::new(ringlb_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ringlb")
}

/// Runs `ringlb ARGS...` and kills it if it has not exited within `limit`
/// (a command that should fail fast must not hang a test run).
pub fn ringlb_cmd_within(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(ringlb_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ringlb");
    let pid = child.id() as i32;
    // The output is collected on a thread so a chatty child never blocks on
    // a full pipe while this one waits.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for ringlb"),
        Err(_) => {
            // SAFETY: signals the child started above (not yet reaped: its
            // waiting thread has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = rx.recv().unwrap().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            panic!(
                "ringlb {args:?} still running after {limit:?}: {}",
                &stderr[..stderr.len().min(2000)]
            );
        }
    }
}

/// How a test backend treats each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Writes its tag and a newline, then echoes until EOF, then closes.
    TagEcho,
    /// Echoes until EOF, then closes.
    Echo,
    /// Accepts and never reads or writes.
    Stall,
    /// Reads once, writes this reply, closes.
    Reply(&'static str),
    /// Accepts and resets the connection at once.
    Reset,
    /// Reads once, then resets the connection (an abort mid-exchange).
    ResetAfterRead,
    /// Reads a PROXY protocol header (v1 or v2) and writes one line saying
    /// what it carried: `v1 SRC DST` / `v2 SRC DST`, `LOCAL` (ringlb's own connection),
    /// or `BAD ...`; then echoes. Like a real server that requires the
    /// header, it waits at most 2 s for it.
    ProxyReport,
}

/// A backend thread on a loopback port; stops accepting on drop.
pub struct Backend {
    pub addr: SocketAddr,
    pub tag: String,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Connections its accept thread took after it was told to die.
    lost: Arc<AtomicUsize>,
    /// Its accept thread has exited.
    exited: Arc<AtomicBool>,
    listen_fd: i32,
}

impl Backend {
    pub fn start(tag: &str, behaviour: Behaviour) -> Backend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tag, behaviour)
    }

    pub fn start_on(addr: SocketAddr, tag: &str, behaviour: Behaviour) -> Backend {
        let listener = listen(addr);
        let addr = listener.local_addr().unwrap();
        let listen_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicUsize::new(0));
        let exited = Arc::new(AtomicBool::new(false));
        let (acc, st, t) = (accepted.clone(), stop.clone(), tag.to_string());
        let (lo, ex) = (lost.clone(), exited.clone());
        thread::spawn(move || {
            for s in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    if s.is_ok() {
                        lo.fetch_add(1, Ordering::SeqCst);
                    }
                    break;
                }
                let Ok(s) = s else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                let t = t.clone();
                thread::spawn(move || serve(s, &t, behaviour));
            }
            ex.store(true, Ordering::SeqCst);
        });
        Backend {
            addr,
            tag: tag.to_string(),
            accepted,
            stop,
            lost,
            exited,
            listen_fd,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Dies like a process, and returns the connections that died with it:
    /// completed handshakes still in its accept queue (reset, as the kernel
    /// resets them when a process dies) and any its accept thread took after
    /// the death. No balancer can save those: their connect had already
    /// succeeded, and the backend drops them before sending a byte.
    pub fn kill(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        // The listener belongs to the accept thread; borrow it without
        // closing it here, and take what waits in its queue without blocking.
        // SAFETY: listen_fd stays open until this Backend is dropped below.
        let listener = std::mem::ManuallyDrop::new(unsafe {
            <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(self.listen_fd)
        });
        listener.set_nonblocking(true).unwrap();
        let mut reset = 0;
        while let Ok((s, _)) = listener.accept() {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            reset += 1;
        }
        let (lost, exited) = (self.lost.clone(), self.exited.clone());
        drop(self);
        wait_until(Duration::from_secs(2), || exited.load(Ordering::SeqCst));
        reset + lost.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Like a process dying: the port stops taking connections at once
        // (shutdown of the listening socket), which also wakes the blocking
        // accept so the thread sees the flag and closes it. Connections
        // already accepted keep their threads until they end.
        self.stop.store(true, Ordering::SeqCst);
        unsafe {
            libc::shutdown(self.listen_fd, libc::SHUT_RDWR);
        }
    }
}

/// A blocking listener with a backlog big enough for bursts of connects.
pub fn listen(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(4096).unwrap();
    s.into()
}

fn serve(mut s: TcpStream, tag: &str, behaviour: Behaviour) {
    match behaviour {
        Behaviour::Stall => {
            thread::sleep(Duration::from_secs(60));
        }
        Behaviour::Reply(reply) => {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(reply.as_bytes());
        }
        Behaviour::Reset => {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
        Behaviour::ResetAfterRead => {
            let mut buf = [0u8; 1024];
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = s.read(&mut buf);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
        Behaviour::ProxyReport => {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let line = read_proxy_header(&mut s).unwrap_or_else(|e| format!("BAD {e}"));
            if s.write_all(format!("{line}\n").as_bytes()).is_err() {
                return;
            }
            s.set_read_timeout(None).ok();
            serve(s, tag, Behaviour::Echo);
        }
        Behaviour::TagEcho | Behaviour::Echo => {
            if let Behaviour::TagEcho = behaviour {
                if s.write_all(format!("{tag}\n").as_bytes()).is_err() {
                    return;
                }
            }
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

/// Connects (optionally from a chosen local IP) and reads the tag line.
pub fn read_tag(lb: SocketAddr, from: Option<std::net::IpAddr>) -> std::io::Result<String> {
    let s = connect_from(lb, from)?;
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&line)),
                ))
            }
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// A TCP connection from `from` (any 127.x address) to `to`.
pub fn connect_from(to: SocketAddr, from: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    match from {
        None => TcpStream::connect_timeout(&to, Duration::from_secs(5)),
        Some(ip) => {
            let sock = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::new(ip, 0).into())?;
            sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
            Ok(sock.into())
        }
    }
}

/// A listener block and a pool block for a config.
pub fn tcp_config(
    engine: &str,
    listen: SocketAddr,
    extra_listener: &str,
    backends: &[(SocketAddr, u32)],
    extra_pool: &str,
) -> String {
    let mut c = format!(
        "[runtime]\nworkers = 2\nio_engine = \"{engine}\"\nshutdown_timeout = \"2s\"\n\n[[listener]]\nname = \"t\"\nbind = \"{listen}\"\npool = \"p\"\nconnect_timeout = \"1s\"\n{extra_listener}\n\n[[pool]]\nname = \"p\"\ntable_size = 65537\n{extra_pool}\n"
    );
    for (addr, w) in backends {
        c.push_str(&format!("[[pool.backend]]\naddr = \"{addr}\"\nweight = {w}\n"));
    }
    c
}

pub fn lb_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `ringlb ctl -s SOCK --json ARGS` and returns (exit code, reply).
pub fn ctl_json(sock: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(ringlb_bin())
        .arg("ctl")
        .arg("-s")
        .arg(sock)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null);
    (code, v)
}

/// Runs `ringlb ctl -s SOCK ARGS` (human output): (exit code, stdout, stderr).
pub fn ctl_text(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ringlb_bin())
        .arg("ctl")
        .arg("-s")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The backend entry for `addr` from `ctl backends`.
pub fn backend_info(sock: &Path, pool: &str, addr: SocketAddr) -> serde_json::Value {
    let (code, v) = ctl_json(sock, &["backends", pool]);
    assert_eq!(code, 0, "{v}");
    v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A config with a control socket in `dir`; listeners and pools given whole.
pub fn config_with_control(engine: &str, sock: &Path, body: &str) -> String {
    format!("[runtime]\nworkers = 2\nio_engine = \"{engine}\"\nshutdown_timeout = \"2s\"\n\n[control]\nsocket = \"{}\"\n\n{body}", sock.display())
}

/// Short connections (connect, read the backend's tag, close) from
/// `threads` threads until stopped; counts attempts and client-visible failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    pub fn start(target: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let attempted = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, attempted, failed) = (stop.clone(), attempted.clone(), failed.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        attempted.fetch_add(1, Ordering::SeqCst);
                        if read_tag(target, None).is_err() {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            attempted,
            failed,
            threads,
            started: Instant::now(),
        }
    }

    /// Stops the load: (attempted, failed, seconds it ran).
    pub fn finish(self) -> (usize, usize, f64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.attempted.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.started.elapsed().as_secs_f64(),
        )
    }
}

/// A running ringlb with a control socket.
pub struct Controlled {
    pub lb: Ringlb,
    pub sock: PathBuf,
    pub listen: SocketAddr,
    _dir: TempDir,
}

/// Starts ringlb on `engine` with `body` (listeners, pools) and a control
/// socket; waits until `listen` is listening.
pub fn start_controlled(engine: &str, body: &str, listen: SocketAddr) -> Controlled {
    let dir = TempDir::new("ctl");
    let sock = dir.0.join("ctl.sock");
    let lb = Ringlb::start(&config_with_control(engine, &sock, body), listen);
    Controlled {
        lb,
        sock,
        listen,
        _dir: dir,
    }
}

/// Reads one PROXY protocol header (v1 text or v2 binary) off `s`:
/// `v1 SRC DST`, `v2 SRC DST` or `LOCAL`.
pub fn read_proxy_header(s: &mut TcpStream) -> Result<String, String> {
    const V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut start = [0u8; 12];
    s.read_exact(&mut start).map_err(|e| format!("no header: {e}"))?;
    if &start == V2 {
        let mut fixed = [0u8; 4];
        s.read_exact(&mut fixed).map_err(|e| e.to_string())?;
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        let mut block = vec![0u8; len];
        s.read_exact(&mut block).map_err(|e| e.to_string())?;
        return match (fixed[0], fixed[1], len) {
            (0x20, _, _) => Ok("LOCAL".into()),
            (0x21, 0x11, 12) => {
                let ip = |b: &[u8]| std::net::IpAddr::from([b[0], b[1], b[2], b[3]]);
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                let src = SocketAddr::new(ip(&block[0..4]), port(&block[8..10]));
                let dst = SocketAddr::new(ip(&block[4..8]), port(&block[10..12]));
                Ok(format!("v2 {src} {dst}"))
            }
            (0x21, 0x21, 36) => {
                let ip = |b: &[u8]| std::net::IpAddr::from(<[u8; 16]>::try_from(b).unwrap());
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                let src = SocketAddr::new(ip(&block[0..16]), port(&block[32..34]));
                let dst = SocketAddr::new(ip(&block[16..32]), port(&block[34..36]));
                Ok(format!("v2 {src} {dst}"))
            }
            other => Err(format!("v2 header {other:?}")),
        };
    }
    if !start.starts_with(b"PROXY ") {
        return Err(format!("starts with {:?}", String::from_utf8_lossy(&start)));
    }
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() > 107 {
            return Err("v1 line longer than 107 bytes".into());
        }
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
    let f: Vec<&str> = text.split(' ').collect();
    match f.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok("LOCAL".into()),
        ["PROXY", "TCP4" | "TCP6", src, dst, sport, dport] => {
            let addr = |ip: &str, port: &str| -> Result<SocketAddr, String> {
                Ok(SocketAddr::new(
                    ip.parse().map_err(|_| format!("bad address in {text:?}"))?,
                    port.parse().map_err(|_| format!("bad port in {text:?}"))?,
                ))
            };
            Ok(format!("v1 {} {}", addr(src, sport)?, addr(dst, dport)?))
        }
        _ => Err(format!("v1 line {text:?}")),
    }
}

/// Sends one typed request straight to the control socket (no `ctl`
/// process) and parses the reply with the protocol's own types.
pub fn ctl_request(sock: &Path, req: &ringlb::protocol::Request) -> ringlb::protocol::Reply<'static> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    s.write_all(format!("{}\n", req.to_line()).as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    ringlb::protocol::Reply::parse(req, line.trim_end()).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// A TLS ClientHello record naming `sni` (with supported_versions and
/// padding, the shape of `proxy::client_hello`'s unit tests'), for the SNI
/// and access-log tests.
pub fn client_hello(sni: &[u8]) -> Vec<u8> {
    let mut list = vec![0u8];
    list.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    list.extend_from_slice(sni);
    let mut ext_body = (list.len() as u16).to_be_bytes().to_vec();
    ext_body.extend_from_slice(&list);
    let mut exts = vec![0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04, 0, 0];
    exts.extend_from_slice(&(ext_body.len() as u16).to_be_bytes());
    exts.extend_from_slice(&ext_body);
    exts.extend_from_slice(&[0x00, 0x15, 0x01, 0x00]);
    exts.resize(exts.len() + 256, 0);
    let mut ch = vec![3, 3];
    ch.extend_from_slice(&[7; 32]);
    ch.push(0);
    ch.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    ch.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    ch.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(ch.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&ch);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}
