//! `ringlb check`, `--version`, `--help` through the real binary.

mod common;

use common::*;

/// Runs `ringlb check` on a shipped config and expects exit 0 and `summary`.
fn assert_valid(config: &str, summary: &str) {
    let path = format!("{}/config/{config}", env!("CARGO_MANIFEST_DIR"));
    let out = ringlb_cmd(&["check", "-c", &path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(summary), "{stdout}");
}

#[test]
fn check_accepts_a_good_config_with_a_summary() {
    assert_valid("demo.toml", "ok: 2 listener(s), 2 pool(s), 5 backend(s)");
}

#[test]
fn the_example_config_is_valid() {
    // Its control socket is /run/ringlb/ctl.sock: only a user who may create
    // /run/ringlb could run it, and `check` says so to anyone else.
    if unsafe { libc::access(c"/run".as_ptr(), libc::W_OK | libc::X_OK) } != 0
        && !std::path::Path::new("/run/ringlb").exists()
    {
        let path = format!("{}/config/ringlb.toml", env!("CARGO_MANIFEST_DIR"));
        let out = ringlb_cmd(&["check", "-c", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("control.socket: /run: cannot create the socket there"),
            "{stderr}"
        );
        assert!(stderr.contains("1 error(s)"), "{stderr}");
        return;
    }
    assert_valid("ringlb.toml", "ok: 5 listener(s), 5 pool(s), 9 backend(s)");
}

#[test]
fn check_rejects_a_bad_config_and_names_the_key() {
    let dir = TempDir::new("check");
    let bad = dir.file(
        "bad.toml",
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\npool = \"web\"\nhash_kee = \"src_ip\"\n\n[[pool]]\nname = \"web\"\n[[pool.backend]]\naddr = \"127.0.0.1:9001\"\n",
    );
    let out = ringlb_cmd(&["check", "-c", path_str(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.toml: line 5, column 1: unknown field `hash_kee`"),
        "{stderr}"
    );
}

#[test]
fn check_reports_every_semantic_error() {
    let dir = TempDir::new("check");
    let bad = dir.file(
        "bad.toml",
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\npool = \"nope\"\n\n[[pool]]\nname = \"web\"\ntable_size = 1000\n[[pool.backend]]\naddr = \"127.0.0.1:99999\"\n",
    );
    let out = ringlb_cmd(&["check", "-c", path_str(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("pool \"web\": table_size: 1000 is not prime"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pool \"web\": backend 1: addr: \"127.0.0.1:99999\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("listener \"web\": pool: no pool named \"nope\""),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_address_in_use() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let dir = TempDir::new("inuse");
    let cfg = dir.file(
        "c.toml",
        &tcp_config("auto", addr, "", &[("127.0.0.1:9".parse().unwrap(), 1)], ""),
    );
    let out = ringlb_cmd(&["run", "-c", path_str(&cfg)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already in use by another process"), "{stderr}");
}

#[test]
fn version_and_help() {
    let out = ringlb_cmd(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ringlb "));
    let out = ringlb_cmd(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["run", "check", "demo"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn epoll_fallback_is_logged_once_when_io_uring_is_blocked() {
    let listen = lb_addr();
    let backend = Backend::start("x", Behaviour::TagEcho);
    let dir = TempDir::new("fallback");
    let cfg = dir.file("c.toml", &tcp_config("auto", listen, "", &[(backend.addr, 1)], ""));
    let child = std::process::Command::new(ringlb_bin())
        .args(["run", "-c", path_str(&cfg)])
        .env("RINGLB_DISABLE_IO_URING", "1")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read_tag(listen, None).is_err() {
        assert!(std::time::Instant::now() < deadline, "no service on epoll fallback");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("io_uring unavailable").count(), 1, "{log}");
    assert!(log.contains("worker 0 started on epoll"), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
}

#[test]
fn uring_engine_fails_clearly_when_io_uring_is_blocked() {
    let dir = TempDir::new("uring");
    let cfg = dir.file(
        "c.toml",
        &tcp_config("uring", lb_addr(), "", &[("127.0.0.1:9".parse().unwrap(), 1)], ""),
    );
    let out = std::process::Command::new(ringlb_bin())
        .args(["run", "-c", path_str(&cfg)])
        .env("RINGLB_DISABLE_IO_URING", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("io_engine = \"uring\" but io_uring is unavailable"),
        "{stderr}"
    );
}

#[test]
fn check_and_run_refuse_a_config_with_no_listener() {
    let dir = TempDir::new("nolistener");
    let full = tcp_config("auto", lb_addr(), "", &[("127.0.0.1:9".parse().unwrap(), 1)], "");
    // Empty, and cut off before its first [[listener]] (a truncated copy).
    let cut = &full[..full.find("[[listener]]").unwrap()];
    for (name, text) in [("empty.toml", ""), ("truncated.toml", cut)] {
        let cfg = dir.file(name, text);
        for cmd in ["check", "run"] {
            let out = ringlb_cmd_within(&[cmd, "-c", path_str(&cfg)], std::time::Duration::from_secs(10));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {name}: {stderr}");
            assert!(
                stderr.contains(&format!("{name}: listener: no [[listener]]")),
                "{cmd} {name}: {stderr}"
            );
        }
    }
}

/// Configs that `run` refuses at start: `check` must refuse each of them too,
/// with the same error (and `run` still fails fast).
#[test]
fn check_refuses_what_run_would_refuse() {
    let dir = TempDir::new("check-run");
    let backend = "127.0.0.1:9".parse().unwrap();
    let port = free_port();
    let specific: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let a_file = dir.file("not-a-dir", "");
    let long_dir = dir.0.join("d".repeat(100));
    let cases: Vec<(&str, String, String)> = vec![
        (
            "metrics on a listener's address",
            tcp_config("auto", specific, "", &[(backend, 1)], "").replace(
                "[[listener]]",
                &format!("[control]\nmetrics = \"{specific}\"\n\n[[listener]]"),
            ),
            format!("control.metrics: {specific} is already used by listener \"t\""),
        ),
        (
            "metrics on a wildcard covering a listener",
            tcp_config("auto", specific, "", &[(backend, 1)], "").replace(
                "[[listener]]",
                &format!("[control]\nmetrics = \"0.0.0.0:{port}\"\n\n[[listener]]"),
            ),
            format!("control.metrics: 0.0.0.0:{port} overlaps listener \"t\" on {specific}"),
        ),
        (
            "0.0.0.0:P next to 127.0.0.1:P",
            tcp_config("auto", specific, "", &[(backend, 1)], "").replace(
                "[[pool]]",
                &format!("[[listener]]\nname = \"any\"\nbind = \"0.0.0.0:{port}\"\npool = \"p\"\n\n[[pool]]"),
            ),
            format!("listener \"any\": bind: 0.0.0.0:{port} overlaps listener \"t\" on {specific}"),
        ),
        (
            "control socket under a regular file",
            tcp_config("auto", lb_addr(), "", &[(backend, 1)], "").replace(
                "[[listener]]",
                &format!("[control]\nsocket = \"{}/ctl.sock\"\n\n[[listener]]", a_file.display()),
            ),
            format!("control.socket: {}: not a directory", a_file.display()),
        ),
        (
            "control socket path too long",
            tcp_config("auto", lb_addr(), "", &[(backend, 1)], "").replace(
                "[[listener]]",
                &format!(
                    "[control]\nsocket = \"{}/ctl.sock\"\n\n[[listener]]",
                    long_dir.display()
                ),
            ),
            "control.socket: longer than the 107 bytes a Unix socket path may have".to_string(),
        ),
        (
            "listener on an IPv4-mapped IPv6 address",
            tcp_config(
                "auto",
                format!("[::ffff:127.0.0.1]:{port}").parse().unwrap(),
                "",
                &[(backend, 1)],
                "",
            ),
            format!("listener \"t\": bind: [::ffff:127.0.0.1]:{port}: an IPv4-mapped address; use 127.0.0.1:{port}"),
        ),
        (
            "listener on an address this host does not have",
            tcp_config("auto", "192.0.2.1:8080".parse().unwrap(), "", &[(backend, 1)], ""),
            "listener \"t\": bind: 192.0.2.1:8080: cannot bind here:".to_string(),
        ),
    ];
    for (what, text, expected) in cases {
        let cfg = dir.file("c.toml", &text);
        for cmd in ["check", "run"] {
            let out = ringlb_cmd_within(&[cmd, "-c", path_str(&cfg)], std::time::Duration::from_secs(10));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd}, {what}: {stderr}");
            assert!(
                stderr.contains(&expected),
                "{cmd}, {what}: expected {expected:?} in {stderr}"
            );
        }
    }
}

#[test]
fn check_refuses_io_engine_uring_where_io_uring_is_blocked() {
    let dir = TempDir::new("check-uring");
    let cfg = dir.file(
        "c.toml",
        &tcp_config("uring", lb_addr(), "", &[("127.0.0.1:9".parse().unwrap(), 1)], ""),
    );
    let out = std::process::Command::new(ringlb_bin())
        .args(["check", "-c", path_str(&cfg)])
        .env("RINGLB_DISABLE_IO_URING", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("runtime.io_engine: io_engine = \"uring\" but io_uring is unavailable"),
        "{stderr}"
    );
}

/// A `ringlb run` child, killed on drop (a failing test leaves nothing behind).
struct Run(std::process::Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts ringlb on `config` and waits until a connection through `listen`
/// is served by it: the process, or its stderr if it exited at start.
fn start_once(config: &std::path::Path, listen: std::net::SocketAddr) -> Result<Run, String> {
    let mut run = Run(std::process::Command::new(ringlb_bin())
        .args(["run", "-c", path_str(config)])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = run.0.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(run.0.stderr.as_mut().unwrap(), &mut err).unwrap();
            return Err(err);
        }
        if read_tag(listen, None).is_ok() {
            return Ok(run);
        }
        assert!(std::time::Instant::now() < deadline, "not serving within 10s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Connections through ringlb that stay open (so the kill leaves sockets behind).
fn open_connections(listen: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut c = connect_from(listen, None).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let mut tag = [0u8; 2];
            std::io::Read::read_exact(&mut c, &mut tag).unwrap();
            c
        })
        .collect()
}

#[test]
fn an_immediate_restart_after_kill_or_stop_serves_and_a_foreign_listener_still_fails() {
    let backend = Backend::start("x", Behaviour::TagEcho);
    for engine in ["uring", "epoll"] {
        let listen = lb_addr();
        let dir = TempDir::new("restart");
        let cfg = dir.file("c.toml", &tcp_config(engine, listen, "", &[(backend.addr, 1)], ""));
        // Even rounds end with kill -9 (connections open), odd ones with a
        // graceful stop; each next start comes at once.
        for round in 0..6 {
            let mut lb = start_once(&cfg, listen).unwrap_or_else(|e| panic!("{engine} start {round}: {e}"));
            let held = open_connections(listen, 5);
            if round % 2 == 0 {
                lb.0.kill().unwrap();
            } else {
                unsafe { libc::kill(lb.0.id() as i32, libc::SIGTERM) };
                drop(held);
            }
            lb.0.wait().unwrap();
        }
    }
    // A live listener of another process: refused at once.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let dir = TempDir::new("foreign");
    let cfg = dir.file("c.toml", &tcp_config("auto", addr, "", &[(backend.addr, 1)], ""));
    let started = std::time::Instant::now();
    let out = ringlb_cmd_within(&["run", "-c", path_str(&cfg)], std::time::Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{addr} is already in use by another process")),
        "{stderr}"
    );
    // It failed at once, on finding the live holder (this test process), not
    // after waiting out ringlb's orphan window: the holder is named only on
    // that path. (A wall-clock bound here lost to process start-up on a
    // loaded 2-core box.)
    assert!(
        stderr.contains(&format!("(pid {} ", std::process::id())),
        "a real conflict names its live holder and fails at once (took {:?}): {stderr}",
        started.elapsed()
    );
}

/// Usage errors exit 64 (EX_USAGE), apart from 2 = control socket unreachable;
/// help and version exit 0.
#[test]
fn usage_errors_have_their_own_exit_code() {
    for args in [
        &["frobnicate"][..],
        &["ctl", "-s", "/nonexistent/ctl.sock", "bogus"],
        &["ctl", "-s", "/nonexistent/ctl.sock", "weight", "web"],
        // Neither -s nor -c: nothing to talk to, a usage error.
        &["ctl", "status"],
        &["check"],
    ] {
        let out = ringlb_cmd(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("Usage"), "{args:?}: {stderr}");
    }
    let out = ringlb_cmd(&["ctl", "-s", "/nonexistent/ctl.sock", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ringlb_cmd(&["ctl", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("64 on a usage error"), "{help}");
}

/// `ringlb check ... | head -0` and `> /dev/full` do not panic: a closed pipe
/// ends the command quietly with its own exit code; any other write error is
/// said on stderr and exits 74 (EX_IOERR).
#[test]
fn write_errors_on_stdout_do_not_panic() {
    use std::process::{Command, Stdio};
    let config = format!("{}/config/demo.toml", env!("CARGO_MANIFEST_DIR"));
    // The read end is closed before ringlb has even read its config.
    let mut child = Command::new(ringlb_bin())
        .args(["check", "-c", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "", "a closed pipe is not an error to report");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = Command::new(ringlb_bin())
        .args(["check", "-c", &config])
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("No space left on device") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A config that is not UTF-8 is an error at a line and column, like any other.
#[test]
fn a_config_that_is_not_utf8_names_the_line() {
    let dir = TempDir::new("utf8");
    let path = dir.0.join("latin1.toml");
    std::fs::write(&path, b"[runtime]\nworkers = 2\n# caf\xe9 au lait\n").unwrap();
    let out = ringlb_cmd(&["check", "-c", path_str(&path)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 3, column 6"), "{stderr}");
    assert!(stderr.contains("UTF-8"), "{stderr}");
}
