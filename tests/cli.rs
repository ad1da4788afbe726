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
    assert_valid("demo.toml", "ok: 1 listener(s), 1 pool(s), 3 backend(s)");
}

#[test]
fn the_example_config_is_valid() {
    assert_valid("ringlb.toml", "ok: 3 listener(s), 3 pool(s), 6 backend(s)");
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
