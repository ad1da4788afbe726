//! systemd's notify protocol through the real binary: the test is the
//! service manager, with a notify socket of its own, and checks the
//! messages ringlb sends at start, on reload and at stop.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Receives notify messages until one contains `want` (or 10 s pass).
fn wait_message(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(msg.clone());
                if msg.lines().any(|l| l == want) {
                    return msg;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {want:?} within 10s; got {seen:?}");
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn notify_cycle(engine: &str, abstract_name: bool) {
    let backend = Backend::start("b", Behaviour::TagEcho);
    let listen = lb_addr();
    let dir = TempDir::new("notify");
    let (sock, env_value) = if abstract_name {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ringlb-test-notify-{}-{engine}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
    } else {
        let path = dir.0.join("notify.sock");
        (UnixDatagram::bind(&path).unwrap(), path.display().to_string())
    };
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let config = tcp_config(engine, listen, "", &[(backend.addr, 1)], "");
    let mut lb = Ringlb::start_with(&config, listen, &[("NOTIFY_SOCKET", &env_value)]);
    let mut seen = Vec::new();

    let ready = wait_message(&sock, "READY=1", &mut seen);
    // READY=1 means serving: a client gets through right after it.
    assert_eq!(read_tag(listen, None).unwrap(), "b", "{ready}");
    assert!(ready.contains("STATUS=serving"), "{ready}");

    let before = monotonic_usec();
    lb.signal(libc::SIGHUP);
    let reloading = wait_message(&sock, "RELOADING=1", &mut seen);
    let after = monotonic_usec();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC {usec} not within [{before}, {after}]"
    );
    let ready = wait_message(&sock, "READY=1", &mut seen);
    assert!(ready.contains("config generation"), "{ready}");

    // A reload that is rejected is followed by READY=1 too: the old config serves on.
    std::fs::write(&lb.config, "not toml [").unwrap();
    lb.signal(libc::SIGHUP);
    wait_message(&sock, "RELOADING=1", &mut seen);
    let ready = wait_message(&sock, "READY=1", &mut seen);
    assert!(ready.contains("last reload rejected"), "{ready}");
    assert_eq!(read_tag(listen, None).unwrap(), "b");

    lb.signal(libc::SIGTERM);
    wait_message(&sock, "STOPPING=1", &mut seen);
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn notify_messages_on_start_reload_and_stop_uring() {
    notify_cycle("uring", false);
}

#[test]
fn notify_messages_on_start_reload_and_stop_epoll() {
    notify_cycle("epoll", false);
}

#[test]
fn notify_to_an_abstract_socket() {
    notify_cycle("epoll", true);
}

#[test]
fn the_shipped_unit_file_is_notify_and_hardened() {
    let unit = std::fs::read_to_string(format!("{}/config/ringlb.service", env!("CARGO_MANIFEST_DIR"))).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=1048576",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "config/ringlb.service lacks {line:?}"
        );
    }
    // systemd-analyze, where the machine has it, checks the unit as systemd reads it.
    if let Ok(out) = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("{}/config/ringlb.service", env!("CARGO_MANIFEST_DIR")))
        .output()
    {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify complains about the binary's path not existing here; nothing else.
        let other: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("/usr/local/bin/ringlb") && !l.trim().is_empty())
            .collect();
        assert!(other.is_empty(), "systemd-analyze verify: {other:?}\n{stderr}");
    } else {
        println!("systemd-analyze not installed: unit file checked by its lines only");
    }
}

/// The upgrade path of the shipped unit: SIGUSR2 to the main process starts
/// the binary now at its path with `--takeover`; the new process tells
/// systemd `MAINPID=` itself and `READY=1`, and the old one, which exits 0,
/// sends no `STOPPING=1` (that would stop the service).
#[test]
fn sigusr2_upgrade_hands_the_service_to_the_new_process() {
    let backend = Backend::start("b", Behaviour::TagEcho);
    let listen = lb_addr();
    let dir = TempDir::new("notify-upgrade");
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let ctl = dir.0.join("ctl.sock");
    let body = format!(
        "[[listener]]\nname = \"t\"\nbind = \"{listen}\"\npool = \"p\"\n\n[[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"{}\"\n",
        backend.addr
    );
    let mut lb = Ringlb::start_with(
        &config_with_control("epoll", &ctl, &body),
        listen,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut seen = Vec::new();
    wait_message(&sock, "READY=1", &mut seen);
    let load = Load::start(listen, 2);
    std::thread::sleep(Duration::from_millis(200));
    lb.signal(libc::SIGUSR2);
    let msg = wait_message(&sock, "READY=1", &mut seen);
    let new_pid: u32 = msg
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap_or_else(|| panic!("no MAINPID in {msg:?}"))
        .parse()
        .unwrap();
    // The successor is a process this test caused: stopped at the end.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: signals the successor this test started through ringlb.
            unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
            let proc_dir = format!("/proc/{}", self.0);
            wait_until(Duration::from_secs(5), || !std::path::Path::new(&proc_dir).exists());
        }
    }
    let _stop = Stop(new_pid);
    assert_ne!(new_pid, lb.pid());
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)),
        Some(0),
        "the old process exits 0"
    );
    let (tried, failed, _) = load.finish();
    assert_eq!(
        failed, 0,
        "{failed} of {tried} connections failed across the SIGUSR2 upgrade"
    );
    // Whatever else came, no STOPPING=1: the service is running.
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(!seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    let (code, v) = ctl_json(&ctl, &["status"]);
    assert_eq!((code, v["pid"].as_u64()), (0, Some(u64::from(new_pid))), "{v}");
    assert_eq!(read_tag(listen, None).unwrap(), "b");
}
