//! Transparent source (`source = "client"`) through the real binary, on
//! both io engines, in network namespaces this test creates: a client host,
//! the ringlb host and a backend host, with the backend's default route via
//! ringlb and ringlb's policy route that delivers the backend's replies to
//! clients locally (the setup README "Transparent source" documents).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;

const CLIENT: &str = "10.77.0.2";
const LB_FRONT: &str = "10.77.0.1";
const LB_BACK: &str = "10.78.0.1";
const BACKEND: &str = "10.78.0.2";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three namespaces and two veth links, deleted on drop (even when the test fails).
struct Hosts {
    client: String,
    lb: String,
    backend: String,
}

impl Hosts {
    fn new() -> Hosts {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!("{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let hosts = Hosts {
            client: format!("ringlb-i19-{id}-c"),
            lb: format!("ringlb-i19-{id}-l"),
            backend: format!("ringlb-i19-{id}-b"),
        };
        for ns in [&hosts.client, &hosts.lb, &hosts.backend] {
            ip(&["netns", "add", ns]);
        }
        // Interface names live inside the namespaces, so they need not be unique.
        let (c, l, b) = (&hosts.client, &hosts.lb, &hosts.backend);
        ip(&[
            "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "c1", "netns", l,
        ]);
        ip(&[
            "link", "add", "b0", "netns", b, "type", "veth", "peer", "name", "b1", "netns", l,
        ]);
        for (ns, dev, addr) in [
            (c, "c0", CLIENT),
            (l, "c1", LB_FRONT),
            (l, "b1", LB_BACK),
            (b, "b0", BACKEND),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // The backend host answers clients through ringlb...
        ip(&["-n", b, "route", "add", "default", "via", LB_BACK]);
        // ...and ringlb's host delivers what comes back from the backends
        // locally, to the transparent sockets, instead of forwarding it.
        ip(&["-n", l, "rule", "add", "iif", "b1", "lookup", "100"]);
        ip(&[
            "-n",
            l,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ]);
        hosts
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.client, &self.lb, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an open namespace descriptor; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Backends on the backend host that tell each client the address they
/// see: TCP writes `peer=IP:PORT\n`, UDP replies `peer=IP:PORT`. They
/// serve until the test process ends; the receiver says they are bound.
fn start_backends(ns: &str) -> mpsc::Receiver<()> {
    let (ready_tx, ready) = mpsc::channel();
    in_netns(ns, move || {
        let tcp = TcpListener::bind((BACKEND, 9000)).unwrap();
        let udp = UdpSocket::bind((BACKEND, 9001)).unwrap();
        thread::spawn(move || {
            for s in tcp.incoming() {
                let Ok(mut s) = s else { break };
                let peer = s.peer_addr().unwrap();
                let _ = s.write_all(format!("peer={peer}\n").as_bytes());
            }
        });
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("peer={from}").as_bytes(), from);
        }
    });
    ready
}

fn config(engine: &str, sock: &std::path::Path) -> String {
    format!(
        r#"[runtime]
workers = 2
io_engine = "{engine}"
shutdown_timeout = "1s"
[control]
socket = "{}"

[[listener]]
name = "t"
bind = "{LB_FRONT}:7000"
pool = "t"
source = "client"

[[listener]]
name = "plain"
bind = "{LB_FRONT}:7002"
pool = "t"

[[listener]]
name = "u"
bind = "{LB_FRONT}:7001"
protocol = "udp"
pool = "u"
source = "client"

[[pool]]
name = "t"
[[pool.backend]]
addr = "{BACKEND}:9000"

[[pool]]
name = "u"
[[pool.backend]]
addr = "{BACKEND}:9001"
"#,
        sock.display()
    )
}

fn backend_sees_the_clients_own_address(engine: &str) {
    if !is_root() {
        eprintln!("SKIPPED: transparent source test needs root (network namespaces, IP_TRANSPARENT)");
        return;
    }
    let hosts = Hosts::new();
    start_backends(&hosts.backend)
        .recv_timeout(Duration::from_secs(5))
        .unwrap();
    let dir = TempDir::new("transparent");
    let sock = dir.0.join("ctl.sock");
    let path = dir.file("c.toml", &config(engine, &sock));
    let child = Command::new("ip")
        .args(["netns", "exec", &hosts.lb, ringlb_bin(), "run", "-c", path_str(&path)])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    // Dropped before `hosts`: ringlb stops before its namespace goes.
    let _lb = Ringlb {
        child,
        dir: TempDir::new("transparentrun"),
        log: None,
        config: path.clone(),
    };
    // A pathname Unix socket is reachable from every network namespace.
    assert!(
        wait_until(Duration::from_secs(10), || ctl_json(&sock, &["status"]).0 == 0),
        "ringlb up"
    );
    let seen = in_netns(&hosts.client, || {
        let read_line = |port: u16| {
            let s = TcpStream::connect_timeout(&format!("{LB_FRONT}:{port}").parse().unwrap(), Duration::from_secs(3))
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            line.trim().to_string()
        };
        let tcp: Vec<String> = (0..3).map(|_| read_line(7000)).collect();
        let plain = read_line(7002);
        let u = UdpSocket::bind((CLIENT, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let me = u.local_addr().unwrap();
        let to: SocketAddr = format!("{LB_FRONT}:7001").parse().unwrap();
        let mut udp = Vec::new();
        for i in 0..5 {
            u.send_to(format!("ping {i}").as_bytes(), to).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = u.recv_from(&mut buf).expect("UDP reply through ringlb");
            assert_eq!(from, to, "the reply comes from the listener's address");
            udp.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        (tcp, plain, me, udp)
    })
    .join()
    .unwrap();
    let (tcp, plain, me, udp) = seen;
    for line in &tcp {
        assert!(line.starts_with(&format!("peer={CLIENT}:")), "TCP backend saw {line}");
    }
    // The control: a listener without source = "client" shows ringlb's address.
    assert!(plain.starts_with(&format!("peer={LB_BACK}:")), "{plain}");
    // UDP keeps the client's port too: the backend sees exactly the client.
    for line in &udp {
        assert_eq!(line, &format!("peer={me}"));
    }
}

fn refuses_to_start_without_the_capability(engine: &str) {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run ringlb as an unprivileged user without CAP_NET_ADMIN");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: setpriv (util-linux) is not installed");
        return;
    }
    let dir = TempDir::new("transparentcap");
    let port = free_port();
    let cfg = format!(
        "[runtime]\nio_engine = \"{engine}\"\n[[listener]]\nname = \"u\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"udp\"\npool = \"p\"\nsource = \"client\"\n[[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:9\"\n"
    );
    let path = dir.file("c.toml", &cfg);
    for cmd in ["check", "run"] {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                ringlb_bin(),
                cmd,
                "-c",
                path_str(&path),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} started without CAP_NET_ADMIN: {err}");
        assert!(
            err.contains("listener \"u\": source: source = \"client\" needs CAP_NET_ADMIN"),
            "{cmd}: {err}"
        );
        assert_eq!(err.matches("listener \"u\": source:").count(), 1, "said once: {err}");
    }
}

macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name("uring"); } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name("epoll"); } )*
        }
    };
}

on_both_engines!(
    backend_sees_the_clients_own_address,
    refuses_to_start_without_the_capability
);
