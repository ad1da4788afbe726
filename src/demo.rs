//! `ringlb demo`: the main job on an embedded config, start to finish.
//!
//! Starts the demo backends (threads answering with their own address),
//! runs the real `ringlb run` binary in front of them as a child process,
//! sends connections through it and prints how they spread.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::config::Config;

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

/// A backend that writes its own address to every client, then echoes.
fn start_backend(addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("demo backend {addr}: {e}"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.write_all(format!("{addr}\n").as_bytes());
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Runs the demo, sending `connections` connections through ringlb.
pub fn run(connections: usize) -> Result<(), String> {
    let config = Config::parse(DEMO_CONFIG, Path::new("config/demo.toml")).map_err(|e| e.to_string())?;
    let pool = &config.pools[0];
    let listen = config.listeners[0].bind;
    for b in &pool.backends {
        start_backend(b.addr)?;
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
    std::fs::write(&path, DEMO_CONFIG).map_err(|e| format!("{}: {e}", path.display()))?;
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
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..connections {
        let mut s = TcpStream::connect(listen).map_err(|e| format!("connection {i}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).map_err(|e| format!("connection {i}: {e}"))? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        s.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo)
            .map_err(|e| format!("connection {i}: echo: {e}"))?;
        *spread.entry(String::from_utf8_lossy(&line).into_owned()).or_default() += 1;
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
    println!("\ndemo: stopping ringlb (SIGTERM, graceful)");
    Ok(())
}
