//! `ringlb demo`: the main job on an embedded config, start to finish.
//!
//! Starts the demo backends (threads answering with their own address),
//! runs the real `ringlb run` binary in front of them as a child process,
//! sends connections through it and prints how they spread, then tells a
//! database failover story on a second listener and pool (see `failover`). With
//! `--keep-running` it then keeps a gentle load going and makes one backend fail
//! and recover on a cycle, until Ctrl-C, so the status page has something to show.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;

mod failover;

/// The embedded demo config (config/demo.toml).
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Kills the child balancer when the demo ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A demo backend: writes its own address to every client, then echoes. While
/// `down` is set it is as good as crashed: its port refuses connections and its open
/// connections are closed.
fn start_backend(addr: SocketAddr, down: Arc<AtomicBool>) -> Result<(), String> {
    let bind = move || -> std::io::Result<TcpListener> {
        let l = TcpListener::bind(addr)?;
        // Polled, so that a failure is noticed within a few milliseconds.
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let mut listener = Some(bind().map_err(|e| format!("demo backend {addr}: {e}"))?);
    std::thread::spawn(move || loop {
        if down.load(Ordering::Relaxed) {
            listener = None;
        } else if listener.is_none() {
            listener = bind().ok();
        }
        match listener.as_ref().map(TcpListener::accept) {
            Some(Ok((stream, _))) => {
                let down = down.clone();
                std::thread::spawn(move || serve(stream, addr, &down));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    });
    Ok(())
}

fn serve(mut stream: TcpStream, addr: SocketAddr, down: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.write_all(format!("{addr}\n").as_bytes());
    let mut buf = [0u8; 4096];
    while !down.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
}

/// Opens one client session: connects and reads the backend's address line
/// (waiting up to `read_timeout` for it). Every demo backend greets so.
pub(crate) fn open_session(listen: SocketAddr, read_timeout: Duration) -> std::io::Result<(TcpStream, String)> {
    let s = TcpStream::connect_timeout(&listen, Duration::from_secs(2))?;
    s.set_read_timeout(Some(read_timeout))?;
    let mut line = String::new();
    BufReader::new(&s).take(256).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the greeting",
        ));
    }
    Ok((s, line.trim_end().to_string()))
}

/// One demo connection: the backend's address line, then a 4-byte echo.
fn exchange(listen: SocketAddr) -> std::io::Result<String> {
    let (mut s, backend) = open_session(listen, Duration::from_secs(5))?;
    s.write_all(b"ping")?;
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo)?;
    Ok(backend)
}

/// Set by SIGINT/SIGTERM while the demo keeps running.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// What `ringlb demo --keep-running` does after the first report.
#[derive(Debug, Clone, Copy)]
pub struct KeepRunning {
    /// One backend fails this often (and recovers half-way through the period).
    pub fail_every: Duration,
    /// New connections per second of the gentle load.
    pub rate: u32,
}

/// Runs the demo, sending `connections` connections through ringlb; with `keep`,
/// keeps everything going afterwards until SIGINT/SIGTERM.
pub fn run(connections: usize, keep: Option<KeepRunning>) -> Result<(), String> {
    let config = Config::parse(DEMO_CONFIG, Path::new("config/demo.toml")).map_err(|e| e.to_string())?;
    let pool = config
        .pools
        .iter()
        .find(|p| p.name == "demo")
        .ok_or("config/demo.toml: no pool \"demo\"")?;
    let listen = config
        .listeners
        .iter()
        .find(|l| l.name == "demo")
        .ok_or("config/demo.toml: no listener \"demo\"")?
        .bind;
    let db_pool = config
        .pools
        .iter()
        .find(|p| p.name == failover::POOL)
        .ok_or("config/demo.toml: no pool \"db\"")?;
    let db_listener = config
        .listeners
        .iter()
        .find(|l| l.name == failover::POOL)
        .ok_or("config/demo.toml: no listener \"db\"")?;
    let mut downs = Vec::new();
    for b in pool.backends.iter().chain(&db_pool.backends) {
        let down = Arc::new(AtomicBool::new(false));
        start_backend(b.addr, down.clone())?;
        downs.push(down);
    }
    let roles = failover::start_role_endpoints(db_pool)?;
    if keep.is_some() {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe;
        // it is installed before any thread of ours could depend on the default.
        unsafe {
            libc::signal(libc::SIGINT, on_stop_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
    println!(
        "demo: {} backends up: {}",
        pool.backends.len(),
        pool.backends
            .iter()
            .map(|b| format!("{} (weight {})", b.addr, b.weight))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let path = std::env::temp_dir().join(format!("ringlb-demo-{}.toml", std::process::id()));
    let socket = std::env::temp_dir().join(format!("ringlb-demo-{}.sock", std::process::id()));
    let text = match keep {
        // A control socket too, for `ringlb ctl top` beside the page.
        Some(_) => DEMO_CONFIG.replacen(
            "[control]\n",
            &format!("[control]\nsocket = \"{}\"\n", socket.display()),
            1,
        ),
        None => DEMO_CONFIG.to_string(),
    };
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .arg("run")
        .arg("-c")
        .arg(&path)
        .spawn()
        .map_err(|e| format!("starting ringlb: {e}"))?;
    let mut guard = ChildGuard(child);

    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if let Ok(Some(status)) = guard.0.try_wait() {
            let _ = std::fs::remove_file(&path);
            return Err(format!("ringlb exited at start ({status}); see its log above"));
        }
        if Instant::now() > deadline {
            return Err(format!("ringlb did not start listening on {listen} within 10s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let _ = std::fs::remove_file(&path);
    if let Some(m) = config.control.metrics {
        println!("demo: status page on http://{m}/ (JSON: http://{m}/status.json, Prometheus: http://{m}/metrics)");
    }
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..connections {
        let backend = exchange(listen).map_err(|e| format!("connection {i}: {e}"))?;
        *spread.entry(backend).or_default() += 1;
    }
    let elapsed = started.elapsed();

    let total_weight: u32 = pool.backends.iter().map(|b| b.weight).sum();
    println!(
        "\ndemo: {connections} connections through ringlb on {listen} in {:.2}s",
        elapsed.as_secs_f64()
    );
    println!("{:<18} {:>6} {:>9} {:>9}", "backend", "weight", "expected", "got");
    for b in &pool.backends {
        let got = spread.get(&b.addr.to_string()).copied().unwrap_or(0);
        let expected = connections as f64 * b.weight as f64 / total_weight as f64;
        println!(
            "{:<18} {:>6} {:>8.0}% {:>8.1}%",
            b.addr,
            b.weight,
            100.0 * expected / connections as f64,
            100.0 * got as f64 / connections as f64
        );
    }
    if let Err(e) = failover::run(&config, db_listener, db_pool, &roles) {
        let _ = std::fs::remove_file(&socket);
        return Err(format!("failover story: {e}"));
    }
    if let Some(keep) = keep {
        keep_running(
            keep,
            listen,
            &pool.backends[1].addr,
            &downs[1],
            &config,
            &socket,
            &mut guard,
        );
    }
    println!("\ndemo: stopping ringlb (SIGTERM, graceful)");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The gentle load and the failure cycle, until a stop signal or ringlb's exit.
fn keep_running(
    keep: KeepRunning,
    listen: SocketAddr,
    victim: &SocketAddr,
    down: &AtomicBool,
    config: &Config,
    socket: &Path,
    guard: &mut ChildGuard,
) {
    let page = config
        .control
        .metrics
        .map(|m| format!("http://{m}/"))
        .unwrap_or_default();
    println!("\ndemo: keeping it running until Ctrl-C: {} new connections a second, and backend {victim} failing for {:.0} s every {:.0} s",
        keep.rate, keep.fail_every.as_secs_f64() / 2.0, keep.fail_every.as_secs_f64());
    println!(
        "demo: watch it on {page} or with: ringlb ctl -s {} top",
        socket.display()
    );
    let load = std::thread::spawn(move || {
        let gap = Duration::from_secs_f64(1.0 / f64::from(keep.rate.max(1)));
        let mut next = Instant::now();
        while !STOP.load(Ordering::SeqCst) {
            // A failed exchange is what the page shows as a connect failure or a
            // refusal; the load just goes on.
            let _ = exchange(listen);
            next += gap;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    let mut cycle_start = Instant::now();
    let mut is_down = false;
    while !STOP.load(Ordering::SeqCst) {
        if let Ok(Some(status)) = guard.0.try_wait() {
            println!("demo: ringlb exited ({status})");
            break;
        }
        let t = cycle_start.elapsed();
        if !is_down && t >= keep.fail_every / 2 {
            println!("demo: backend {victim} fails now (stops listening, drops its connections)");
            down.store(true, Ordering::SeqCst);
            is_down = true;
        } else if is_down && t >= keep.fail_every {
            println!("demo: backend {victim} is back");
            down.store(false, Ordering::SeqCst);
            is_down = false;
            cycle_start = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    STOP.store(true, Ordering::SeqCst);
    let _ = load.join();
}
