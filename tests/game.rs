//! Game-server fronts through the real binary, on both io engines: PROXY v2
//! on every UDP datagram (read by a backend that parses it strictly) and
//! routing by a token carried in the datagram.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

/// What a test backend does with each datagram.
#[derive(Clone, Copy)]
enum Mode {
    /// Replies `payload|tag`.
    Tag,
    /// Parses a PROXY v2 DGRAM header strictly and replies
    /// `OK <src> <dst> <payload>|tag`, or `BAD <why>|tag`.
    Proxy,
}

struct UdpBackend {
    addr: SocketAddr,
    tag: String,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpBackend {
    fn start(bind: &str, tag: &str, mode: Mode) -> UdpBackend {
        let socket = UdpSocket::bind(bind).unwrap();
        let addr = socket.local_addr().unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, t) = (stop.clone(), tag.to_string());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 70_000];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let mut reply = match mode {
                    Mode::Tag => buf[..n].to_vec(),
                    Mode::Proxy => match parse_proxy_v2_dgram(&buf[..n]) {
                        Ok((src, dst, rest)) => {
                            let mut r = format!("OK {src} {dst} ").into_bytes();
                            r.extend_from_slice(rest);
                            r
                        }
                        Err(why) => format!("BAD {why}").into_bytes(),
                    },
                };
                reply.extend_from_slice(format!("|{t}").as_bytes());
                let _ = socket.send_to(&reply, from);
            }
        });
        UdpBackend {
            addr,
            tag: tag.to_string(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A strict reader of the PROXY protocol v2 header of one datagram (the
/// spec's section 2.2): signature, version 2 with command PROXY, family
/// INET or INET6 with DGRAM, the exact address block length, and then
/// the payload. Returns the source, the destination and the payload.
fn parse_proxy_v2_dgram(d: &[u8]) -> Result<(SocketAddr, SocketAddr, &[u8]), String> {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    if d.len() < 16 || &d[..12] != SIG {
        return Err("no v2 signature".into());
    }
    if d[12] != 0x21 {
        return Err(format!("version/command {:#04x}, want 0x21 (v2 PROXY)", d[12]));
    }
    let len = u16::from_be_bytes([d[14], d[15]]) as usize;
    if d.len() < 16 + len {
        return Err("header longer than the datagram".into());
    }
    let a = &d[16..16 + len];
    let (src, dst) = match d[13] {
        0x12 if len == 12 => {
            let ip = |o: usize| IpAddr::from([a[o], a[o + 1], a[o + 2], a[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))
        }
        0x22 if len == 36 => {
            let ip = |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&a[o..o + 16]).unwrap()));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))
        }
        f => {
            return Err(format!(
                "family/transport {f:#04x} with length {len}, want UDP4 (12) or UDP6 (36)"
            ))
        }
    };
    Ok((src, dst, &d[16 + len..]))
}

struct Lb {
    lb: Ringlb,
    listen: SocketAddr,
    sock: PathBuf,
    _dir: TempDir,
}

/// ringlb with one UDP listener `g` on `host` (an IP) over pool `p`.
fn start(engine: &str, workers: usize, host: &str, backends: &[SocketAddr], listener_extra: &str) -> Lb {
    let dir = TempDir::new("game");
    let sock = dir.0.join("ctl.sock");
    let ip: IpAddr = host.parse().unwrap();
    let listen = SocketAddr::new(ip, free_port());
    let mut cfg = format!(
        "[runtime]\nworkers = {workers}\nio_engine = \"{engine}\"\nshutdown_timeout = \"1s\"\n[control]\nsocket = \"{}\"\n\n[[listener]]\nname = \"g\"\nbind = \"{listen}\"\nprotocol = \"udp\"\npool = \"p\"\n{listener_extra}\n\n[[pool]]\nname = \"p\"\n",
        sock.display()
    );
    for a in backends {
        cfg.push_str(&format!("[[pool.backend]]\naddr = \"{a}\"\n"));
    }
    let path = dir.file("c.toml", &cfg);
    let child = std::process::Command::new(ringlb_bin())
        .args(["run", "-c", path_str(&path)])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .spawn()
        .unwrap();
    let lb = Ringlb {
        child,
        dir: TempDir::new("gamecfg"),
        log: None,
        config: path,
    };
    assert!(
        wait_until(Duration::from_secs(10), || ctl_json(&sock, &["status"]).0 == 0),
        "ringlb up"
    );
    Lb {
        lb,
        listen,
        sock,
        _dir: dir,
    }
}

fn client(host: &str) -> UdpSocket {
    let c = UdpSocket::bind((host, 0)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c
}

/// Sends `msg` and returns the reply split at its last `|`: (body, backend tag).
fn ask(c: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<(Vec<u8>, String)> {
    c.send_to(msg, to).unwrap();
    let mut buf = [0u8; 4096];
    let (n, from) = c.recv_from(&mut buf).ok()?;
    assert_eq!(from, to, "reply must come from the listener's address");
    let at = buf[..n].iter().rposition(|&b| b == b'|').expect("tagged reply");
    Some((
        buf[..at].to_vec(),
        String::from_utf8_lossy(&buf[at + 1..n]).into_owned(),
    ))
}

/// Asks until a reply comes (the first datagram of a flow can race the
/// listener's start on a loaded machine).
fn ask_retry(c: &UdpSocket, to: SocketAddr, msg: &[u8]) -> (Vec<u8>, String) {
    for _ in 0..5 {
        if let Some(r) = ask(c, to, msg) {
            return r;
        }
    }
    panic!("no reply from {to}");
}

fn token(i: usize) -> [u8; 16] {
    let mut t = *b"tok-0000-0000-00";
    let s = format!("{i:04}");
    t[4..8].copy_from_slice(s.as_bytes());
    t
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn listener_stat(sock: &std::path::Path, key: &str) -> u64 {
    ctl_json(sock, &["stats"]).1["listeners"][0][key].as_u64().unwrap()
}

// === PROXY v2 per datagram ===

fn proxy_v2_header_on_every_datagram(engine: &str, host: &str) {
    let be = UdpBackend::start(&format!("{}:0", bracket(host)), "p1", Mode::Proxy);
    let lb = start(engine, 2, host, &[be.addr], "proxy_protocol = \"v2\"");
    for _ in 0..2 {
        let c = client(host);
        let me = c.local_addr().unwrap();
        for i in 0..20 {
            let msg = format!("hello {i}");
            let (body, tag) = ask_retry(&c, lb.listen, msg.as_bytes());
            assert_eq!(tag, be.tag);
            // The backend learned this client's address and the address it
            // sent to, from a header it parsed strictly, then the payload
            // intact; its reply reached the client unchanged.
            assert_eq!(
                String::from_utf8_lossy(&body),
                format!("OK {me} {} {msg}", lb.listen),
                "datagram {i}"
            );
        }
    }
    // An empty datagram is a header alone.
    let c = client(host);
    let (body, _) = ask_retry(&c, lb.listen, b"");
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("OK {} {} ", c.local_addr().unwrap(), lb.listen)
    );
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// On a wildcard bind the header names the address the client sent to,
/// not `0.0.0.0` / `::`.
fn proxy_v2_on_a_wildcard_bind_names_the_address_reached(engine: &str) {
    for (wild, host) in [("0.0.0.0", "127.0.0.1"), ("::", "::1")] {
        let be = UdpBackend::start(&format!("{}:0", bracket(host)), "p1", Mode::Proxy);
        let lb = start(engine, 1, wild, &[be.addr], "proxy_protocol = \"v2\"");
        let to = SocketAddr::new(host.parse().unwrap(), lb.listen.port());
        let c = client(host);
        // The first datagram may already be queued before ringlb asks for
        // destinations; from the next burst on, each names its own.
        ask_retry(&c, to, b"first");
        for i in 0..5 {
            let msg = format!("wild {i}");
            c.send_to(msg.as_bytes(), to).unwrap();
            let mut buf = [0u8; 2048];
            let (n, _) = c.recv_from(&mut buf).expect("reply");
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert_eq!(text, format!("OK {} {to} {msg}|p1", c.local_addr().unwrap()), "{wild}");
        }
        drop(lb);
    }
}

/// A reload switches the header on for the listener's flows, open ones
/// included, and a reload to `v1` on UDP is refused and changes nothing.
fn reload_turns_proxy_v2_on_and_refuses_v1(engine: &str) {
    let be = UdpBackend::start("127.0.0.1:0", "p1", Mode::Proxy);
    let lb = start(engine, 1, "127.0.0.1", &[be.addr], "");
    let c = client("127.0.0.1");
    let (body, _) = ask_retry(&c, lb.listen, b"plain");
    assert_eq!(body, b"BAD no v2 signature");
    let text = std::fs::read_to_string(&lb.lb.config).unwrap();
    let v1 = text.replace("pool = \"p\"\n", "pool = \"p\"\nproxy_protocol = \"v1\"\n");
    std::fs::write(&lb.lb.config, &v1).unwrap();
    let (code, r) = ctl_json(&lb.sock, &["reload"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["error"].as_str().unwrap().contains("v1 has no UDP form"), "{r}");
    assert_eq!(ask_retry(&c, lb.listen, b"still").0, b"BAD no v2 signature");
    std::fs::write(&lb.lb.config, v1.replace("\"v1\"", "\"v2\"")).unwrap();
    let (code, r) = ctl_json(&lb.sock, &["reload"]);
    assert_eq!(code, 0, "{r}");
    let (body, _) = ask_retry(&c, lb.listen, b"now");
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("OK {} {} now", c.local_addr().unwrap(), lb.listen)
    );
}

fn proxy_v2_ipv4(engine: &str) {
    proxy_v2_header_on_every_datagram(engine, "127.0.0.1");
}

fn proxy_v2_ipv6(engine: &str) {
    proxy_v2_header_on_every_datagram(engine, "::1");
}

// === token routing ===

/// Backends `b0..bN` tagged by index.
fn tag_backends(n: usize) -> Vec<UdpBackend> {
    (0..n)
        .map(|i| UdpBackend::start("127.0.0.1:0", &format!("b{i}"), Mode::Tag))
        .collect()
}

fn a_client_changing_its_port_keeps_its_backend_by_token(engine: &str) {
    let bes = tag_backends(4);
    let addrs: Vec<_> = bes.iter().map(|b| b.addr).collect();
    let lb = start(
        engine,
        2,
        "127.0.0.1",
        &addrs,
        "hash_key = \"token\"\n[listener.token]\noffset = -16\nlength = 16\n",
    );
    let mut seen = HashSet::new();
    for i in 0..24 {
        let t = token(i);
        let mut msg = format!("move {i} ").into_bytes();
        msg.extend_from_slice(&t);
        // One session: three datagrams from one port, then the "NAT" gives
        // the player a new port (a new socket) three times over.
        let mut tag0 = None;
        for _port in 0..4 {
            let c = client("127.0.0.1");
            for _ in 0..3 {
                let (body, tag) = ask_retry(&c, lb.listen, &msg);
                assert_eq!(body, msg, "the token is kept (strip = false)");
                match &tag0 {
                    None => tag0 = Some(tag),
                    Some(t0) => assert_eq!(&tag, t0, "token {i} moved backend after a port change"),
                }
            }
        }
        seen.insert(tag0.clone().unwrap());
        // `ctl route` names the backend a token goes to.
        let (code, r) = ctl_json(&lb.sock, &["route", "g", "127.0.0.1:9", "--token", &hex(&t)]);
        assert_eq!(code, 0, "{r}");
        let chosen: SocketAddr = r["chosen"].as_str().unwrap().parse().unwrap();
        let want = bes.iter().find(|b| Some(&b.tag) == tag0.as_ref()).unwrap().addr;
        assert_eq!(chosen, want, "ctl route for token {i}: {r}");
    }
    // Tokens, not one address, pick backends: 24 tokens reach several.
    assert!(seen.len() >= 3, "24 tokens reached only {seen:?}");
    let (code, out, _) = ctl_text(&lb.sock, &["route", "g", "127.0.0.1:9", "--token", &hex(&token(0))]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("token   {}", hex(&token(0)))), "{out}");
    assert!(!out.contains("port 0 was hashed"), "{out}");
    // On a token listener route without --token, or with a token of the
    // wrong length, is refused with the reason.
    let (code, r) = ctl_json(&lb.sock, &["route", "g", "127.0.0.1:9"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["error"].as_str().unwrap().contains("routes by token"), "{r}");
    let (code, r) = ctl_json(&lb.sock, &["route", "g", "127.0.0.1:9", "--token", "abcd"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["error"].as_str().unwrap().contains("16-byte tokens"), "{r}");
}

/// An address that a NAT hands from one player to another: its datagrams
/// now carry another token, and they go to that token's backend.
fn an_address_carrying_another_token_follows_the_new_token(engine: &str) {
    let bes = tag_backends(4);
    let addrs: Vec<_> = bes.iter().map(|b| b.addr).collect();
    let lb = start(engine, 1, "127.0.0.1", &addrs, "hash_key = \"token\"");
    let c = client("127.0.0.1");
    let with = |i: usize| {
        let mut m = b"p ".to_vec();
        m.extend_from_slice(&token(i));
        m
    };
    let first = ask_retry(&c, lb.listen, &with(0)).1;
    let route = |i: usize| {
        let (_, r) = ctl_json(&lb.sock, &["route", "g", "127.0.0.1:9", "--token", &hex(&token(i))]);
        let a = r["chosen"].as_str().unwrap().to_string();
        bes.iter().find(|b| b.addr.to_string() == a).unwrap().tag.clone()
    };
    let other = (1..50)
        .find(|&i| route(i) != first)
        .expect("a token on another backend");
    assert_eq!(
        ask_retry(&c, lb.listen, &with(other)).1,
        route(other),
        "the new session's backend"
    );
    assert_eq!(ask_retry(&c, lb.listen, &with(other)).1, route(other));
    assert_eq!(ask_retry(&c, lb.listen, &with(0)).1, first, "and back");
}

fn short_datagrams_are_dropped_and_counted(engine: &str) {
    let bes = tag_backends(2);
    let addrs: Vec<_> = bes.iter().map(|b| b.addr).collect();
    let lb = start(
        engine,
        1,
        "127.0.0.1",
        &addrs,
        "hash_key = \"token\"\n[listener.token]\noffset = 2\nlength = 8\n",
    );
    let c = client("127.0.0.1");
    // 10 bytes carry offset 2 + 8: forwarded. 9 do not: dropped.
    ask_retry(&c, lb.listen, b"xx12345678");
    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for _ in 0..5 {
        assert!(
            ask(&c, lb.listen, b"xx1234567").is_none(),
            "a short datagram was forwarded"
        );
    }
    assert!(ask(&c, lb.listen, b"").is_none());
    assert_eq!(listener_stat(&lb.sock, "datagrams_short"), 6);
    assert!(listener_stat(&lb.sock, "datagrams_dropped") >= 6);
    // The flow is still served.
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    ask_retry(&c, lb.listen, b"xx12345678 and more");
}

fn strip_removes_the_token_and_proxy_v2_still_prefixes(engine: &str) {
    // Token at the end, in the middle and at the start, stripped, with a
    // PROXY header in front of what is left.
    for (conf, msg, want) in [
        ("offset = -4\nlength = 4", &b"payloadTOKN"[..], &b"payload"[..]),
        ("offset = 3\nlength = 4", b"payTOKNload", b"payload"),
        ("offset = 0\nlength = 4", b"TOKNpayload", b"payload"),
    ] {
        let be = UdpBackend::start("127.0.0.1:0", "p", Mode::Proxy);
        let extra = format!("hash_key = \"token\"\nproxy_protocol = \"v2\"\n[listener.token]\n{conf}\nstrip = true\n");
        let lb = start(engine, 1, "127.0.0.1", &[be.addr], &extra);
        let c = client("127.0.0.1");
        for _ in 0..3 {
            let (body, _) = ask_retry(&c, lb.listen, msg);
            let want = format!(
                "OK {} {} {}",
                c.local_addr().unwrap(),
                lb.listen,
                String::from_utf8_lossy(want)
            );
            assert_eq!(String::from_utf8_lossy(&body), want, "{conf}");
        }
    }
}

fn a_new_address_with_a_known_token_joins_its_backend_after_a_table_change(engine: &str) {
    // One worker: the token memory is per worker (README).
    let bes = tag_backends(3);
    let lb = start(
        engine,
        1,
        "127.0.0.1",
        &[bes[0].addr, bes[1].addr],
        "hash_key = \"token\"\nidle_timeout = \"60s\"",
    );
    let mut first: HashMap<usize, String> = HashMap::new();
    let mut keep = Vec::new();
    for i in 0..30 {
        let c = client("127.0.0.1");
        let mut msg = b"join ".to_vec();
        msg.extend_from_slice(&token(i));
        first.insert(i, ask_retry(&c, lb.listen, &msg).1);
        keep.push(c);
    }
    // A third backend with a big weight: Maglev now sends most tokens to it.
    let (code, r) = ctl_json(&lb.sock, &["add", "p", &bes[2].addr.to_string(), "--weight", "20"]);
    assert_eq!(code, 0, "{r}");
    let mut moved_in_table = 0;
    for i in 0..30 {
        let (_, r) = ctl_json(&lb.sock, &["route", "g", "127.0.0.1:9", "--token", &hex(&token(i))]);
        let chosen = r["chosen"].as_str().unwrap().to_string();
        let tag = &bes.iter().find(|b| b.addr.to_string() == chosen).unwrap().tag;
        if tag != &first[&i] {
            moved_in_table += 1;
        }
        // The player comes back from a new address: their token's backend,
        // not the table's new choice.
        let c = client("127.0.0.1");
        let mut msg = b"again ".to_vec();
        msg.extend_from_slice(&token(i));
        assert_eq!(ask_retry(&c, lb.listen, &msg).1, first[&i], "token {i}");
    }
    assert!(
        moved_in_table >= 10,
        "the table change moved only {moved_in_table} of 30 tokens"
    );
}

fn two_instances_send_a_token_to_the_same_backend(engine: &str) {
    let bes = tag_backends(5);
    let addrs: Vec<_> = bes.iter().map(|b| b.addr).collect();
    let a = start(engine, 2, "127.0.0.1", &addrs, "hash_key = \"token\"");
    // The other instance lists the backends in another order.
    let mut reversed = addrs.clone();
    reversed.reverse();
    let b = start(engine, 1, "127.0.0.1", &reversed, "hash_key = \"token\"");
    let mut seen = HashSet::new();
    for i in 0..30 {
        let mut msg = b"hi ".to_vec();
        msg.extend_from_slice(&token(i));
        let ta = ask_retry(&client("127.0.0.1"), a.listen, &msg).1;
        let tb = ask_retry(&client("127.0.0.1"), b.listen, &msg).1;
        assert_eq!(ta, tb, "token {i}: instance A and B disagree");
        seen.insert(ta);
    }
    assert!(seen.len() >= 3, "30 tokens reached only {seen:?}");
    drop((a.lb, b.lb));
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
    proxy_v2_ipv4,
    proxy_v2_ipv6,
    proxy_v2_on_a_wildcard_bind_names_the_address_reached,
    reload_turns_proxy_v2_on_and_refuses_v1,
    a_client_changing_its_port_keeps_its_backend_by_token,
    short_datagrams_are_dropped_and_counted,
    an_address_carrying_another_token_follows_the_new_token,
    strip_removes_the_token_and_proxy_v2_still_prefixes,
    a_new_address_with_a_known_token_joins_its_backend_after_a_table_change,
    two_instances_send_a_token_to_the_same_backend,
);
