//! Routing TLS by server name without terminating it (`[[listener.route]]`),
//! on both engines: real `openssl s_client` handshakes end to end through
//! ringlb to the `openssl s_server` of the right pool (a ClientHello split
//! into small segments too), the bytes relayed unchanged, and what is not
//! TLS, has no SNI or matches nothing going to the default pool or refused.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// An `openssl s_server` with a certificate for `CN=name`; killed on drop.
struct TlsServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn tls_server(dir: &Path, name: &str) -> TlsServer {
    let (key, crt) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-subj", &format!("/CN={name}"), "-days", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &addr.to_string()])
        .arg("-cert")
        .arg(&crt)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || is_listening(addr)),
        "s_server did not listen"
    );
    TlsServer { child, addr }
}

/// Runs `openssl s_client` to `to` with `servername` (None: no SNI) and
/// returns the subject CN of the certificate it was shown, once the
/// handshake completed; `None` if it did not.
fn handshake(to: SocketAddr, servername: Option<&str>) -> Option<String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &to.to_string()]);
    match servername {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut text = String::new();
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    let _ = child.wait();
    // "Cipher is ..." is printed only once the handshake is done.
    if !text.contains(", Cipher is ") || text.contains("Cipher is (NONE)") {
        return None;
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("subject=CN = ")
                .or_else(|| l.strip_prefix("subject=CN="))
        })
        .map(str::to_string)
}

/// A relay in front of `to` that forwards the client's first 4 KiB in
/// `chunk`-byte segments, 5 ms apart (TCP_NODELAY), then the rest as it
/// comes: a ClientHello split over many segments.
fn splitter(to: SocketAddr, chunk: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let Ok(mut up) = TcpStream::connect(to) else { return };
            up.set_nodelay(true).unwrap();
            let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut total = 0;
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    for piece in buf[..n].chunks(if total < 4096 { chunk } else { n }) {
                        if up.write_all(piece).is_err() {
                            return;
                        }
                        if total < 4096 {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    total += n;
                }
                let _ = up.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn routes_config(engine: &str, listen: SocketAddr, pools: [SocketAddr; 3], extra: &str) -> String {
    format!(
        "[runtime]\nworkers = 2\nio_engine = \"{engine}\"\nshutdown_timeout = \"2s\"\n\n\
         [[listener]]\nname = \"tls\"\nbind = \"{listen}\"\npool = \"fallback\"\nsni_timeout = \"800ms\"\n{extra}\n\
         [[listener.route]]\nsni = \"db1.example.com\"\npool = \"db1\"\n\
         [[listener.route]]\nsni = \"*.example.com\"\npool = \"web\"\n\n\
         [[pool]]\nname = \"db1\"\n[[pool.backend]]\naddr = \"{}\"\n\
         [[pool]]\nname = \"web\"\n[[pool.backend]]\naddr = \"{}\"\n\
         [[pool]]\nname = \"fallback\"\n[[pool.backend]]\naddr = \"{}\"\n",
        pools[0], pools[1], pools[2]
    )
}

fn tls_handshakes_reach_the_pool_their_name_routes_to(engine: &str) {
    if !openssl() {
        println!("SKIPPED: the openssl command is not installed (.ci/run installs it)");
        return;
    }
    let dir = TempDir::new("sni");
    let (a, b, c) = (
        tls_server(&dir.0, "backend-db1"),
        tls_server(&dir.0, "backend-web"),
        tls_server(&dir.0, "backend-fallback"),
    );
    let listen = lb_addr();
    // A generous sni_timeout: the split ClientHello below takes a while.
    let cfg = routes_config(engine, listen, [a.addr, b.addr, c.addr], "").replace("\"800ms\"", "\"10s\"");
    let _lb = Ringlb::start(&cfg, listen);
    assert_eq!(
        handshake(listen, Some("db1.example.com")).as_deref(),
        Some("backend-db1")
    );
    assert_eq!(
        handshake(listen, Some("DB1.Example.com")).as_deref(),
        Some("backend-db1")
    );
    assert_eq!(
        handshake(listen, Some("www.example.com")).as_deref(),
        Some("backend-web")
    );
    assert_eq!(
        handshake(listen, Some("a.b.example.com")).as_deref(),
        Some("backend-web")
    );
    assert_eq!(
        handshake(listen, Some("example.org")).as_deref(),
        Some("backend-fallback")
    );
    assert_eq!(handshake(listen, None).as_deref(), Some("backend-fallback"));
    // The ClientHello in 7-byte segments, 5 ms apart.
    let split = splitter(listen, 7);
    assert_eq!(
        handshake(split, Some("db1.example.com")).as_deref(),
        Some("backend-db1")
    );
    assert_eq!(
        handshake(split, Some("api.example.com")).as_deref(),
        Some("backend-web")
    );
}

/// Writes `pieces` (10 ms apart) and returns the backend's tag line and
/// the echo of `expect_echo.len()` bytes.
fn tag_and_echo(to: SocketAddr, pieces: &[&[u8]], expect_echo: usize) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for p in pieces {
        s.write_all(p).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut tag = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        tag.push(b[0]);
    }
    let mut echo = vec![0u8; expect_echo];
    s.read_exact(&mut echo).unwrap();
    (String::from_utf8(tag).unwrap(), echo)
}

fn split_hellos_are_relayed_unchanged(engine: &str) {
    let (a, b, c) = (
        Backend::start("db1", Behaviour::TagEcho),
        Backend::start("web", Behaviour::TagEcho),
        Backend::start("fallback", Behaviour::TagEcho),
    );
    let listen = lb_addr();
    let dir = TempDir::new("sni-raw");
    let sock = dir.0.join("ctl.sock");
    let cfg = routes_config(engine, listen, [a.addr, b.addr, c.addr], "").replace(
        "[[listener]]",
        &format!("[control]\nsocket = \"{}\"\n\n[[listener]]", sock.display()),
    );
    let _lb = Ringlb::start(&cfg, listen);
    let h = client_hello(b"db1.example.com");
    // Split inside the record header, inside the SNI, and at the end.
    let cut = h.len() - 3;
    let (tag, echo) = tag_and_echo(listen, &[&h[..2], &h[2..4], &h[4..60], &h[60..cut], &h[cut..]], h.len());
    assert_eq!(tag, "db1");
    assert_eq!(echo, h, "the ClientHello reached the backend unchanged");
    let h = client_hello(b"shop.example.com");
    assert_eq!(
        tag_and_echo(listen, &[&h[..1], &h[1..]], h.len()),
        ("web".to_string(), h.clone())
    );
    // Not TLS: the default pool, the bytes unchanged.
    let plain = b"SELECT 1;\n";
    assert_eq!(
        tag_and_echo(listen, &[plain], plain.len()),
        ("fallback".to_string(), plain.to_vec())
    );
    // A client that waits for the server to speak first: the default pool after sni_timeout.
    let t = Instant::now();
    let (tag, _) = tag_and_echo(listen, &[], 0);
    assert_eq!(tag, "fallback");
    assert!(t.elapsed() >= Duration::from_millis(700), "{:?}", t.elapsed());
    let (_, v) = ctl_json(&sock, &["stats"]);
    assert_eq!(v["listeners"][0]["relayed"], 4, "{v}");
}

/// PROXY header first, then the ClientHello: the header is taken off, the
/// ClientHello routes and is relayed unchanged.
fn proxy_header_then_sni(engine: &str) {
    let (a, b, c) = (
        Backend::start("db1", Behaviour::TagEcho),
        Backend::start("web", Behaviour::TagEcho),
        Backend::start("fallback", Behaviour::TagEcho),
    );
    let listen = lb_addr();
    let extra = "accept_proxy = \"v1\"\ntrusted_sources = [\"127.0.0.0/8\"]\n";
    let _lb = Ringlb::start(&routes_config(engine, listen, [a.addr, b.addr, c.addr], extra), listen);
    let mut bytes = b"PROXY TCP4 203.0.113.1 203.0.113.2 1000 443\r\n".to_vec();
    let h = client_hello(b"x.example.com");
    bytes.extend_from_slice(&h[..30]);
    let (tag, echo) = tag_and_echo(listen, &[&bytes[..20], &bytes[20..], &h[30..]], h.len());
    assert_eq!(tag, "web");
    assert_eq!(echo, h);
}

fn refuse_fallback_refuses_and_counts(engine: &str) {
    let (a, b, c) = (
        Backend::start("db1", Behaviour::TagEcho),
        Backend::start("web", Behaviour::TagEcho),
        Backend::start("fallback", Behaviour::TagEcho),
    );
    let listen = lb_addr();
    let dir = TempDir::new("sni-refuse");
    let sock = dir.0.join("ctl.sock");
    let cfg = routes_config(engine, listen, [a.addr, b.addr, c.addr], "sni_fallback = \"refuse\"\n").replace(
        "[[listener]]",
        &format!("[control]\nsocket = \"{}\"\n\n[[listener]]", sock.display()),
    );
    let _lb = Ringlb::start(&cfg, listen);
    let closed = |bytes: &[u8]| {
        let mut s = TcpStream::connect(listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut b = [0u8; 8];
        matches!(s.read(&mut b), Ok(0) | Err(_))
    };
    assert!(closed(&client_hello(b"other.org")));
    assert!(closed(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(closed(b""), "no ClientHello within sni_timeout");
    let h = client_hello(b"db1.example.com");
    assert_eq!(tag_and_echo(listen, &[&h], h.len()).0, "db1");
    let (_, v) = ctl_json(&sock, &["stats"]);
    let l = &v["listeners"][0];
    assert_eq!(l["refused"]["sni_unmatched"], 2, "{l}");
    assert_eq!(l["refused"]["sni_timeout"], 1, "{l}");
    assert_eq!(c.accepted(), 0, "nothing went to the listener's own pool");
}

macro_rules! on_engines {
    ($($module:ident = $engine:literal),*) => {
        $( mod $module {
            #[test] fn tls_handshakes_reach_the_pool_their_name_routes_to() {
                super::tls_handshakes_reach_the_pool_their_name_routes_to($engine);
            }
            #[test] fn split_hellos_are_relayed_unchanged() { super::split_hellos_are_relayed_unchanged($engine); }
            #[test] fn proxy_header_then_sni() { super::proxy_header_then_sni($engine); }
            #[test] fn refuse_fallback_refuses_and_counts() { super::refuse_fallback_refuses_and_counts($engine); }
        } )*
    };
}

on_engines!(uring = "uring", epoll = "epoll");
