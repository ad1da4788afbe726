//! Accepting the PROXY protocol from clients (`accept_proxy`): the address in
//! the header becomes the client, on both engines; untrusted senders,
//! malformed, oversized, late and cut-short headers are refused and counted.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SIG: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut h = SIG.to_vec();
    h.push(cmd);
    h.push(fam);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn v2_tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut b = src.to_vec();
    b.extend_from_slice(&dst);
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(tlvs);
    v2(0x21, 0x11, &b)
}

fn v2_tcp6(src: std::net::Ipv6Addr, sport: u16, dst: std::net::Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut b = src.octets().to_vec();
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    v2(0x21, 0x21, &b)
}

/// ringlb accepting `accept` from 127.0.0.1 only, sending v1 headers on to
/// a backend that reports them.
fn start(engine: &str, accept: &str, backend: SocketAddr, extra: &str) -> Controlled {
    let listen = lb_addr();
    let body = format!(
        "[[listener]]\nname = \"edge\"\nbind = \"{listen}\"\npool = \"p\"\naccept_proxy = \"{accept}\"\n\
         trusted_sources = [\"127.0.0.1/32\", \"::1\"]\nproxy_header_timeout = \"600ms\"\nproxy_protocol = \"v1\"\n{extra}\n\
         [[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"{backend}\"\n"
    );
    start_controlled(engine, &body, listen)
}

/// Sends `pieces` (pausing between them), then a line of data; returns what
/// the backend said the outgoing header carried, after checking the data
/// came back unchanged.
fn through(listen: SocketAddr, pieces: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
        s.write_all(p).unwrap();
    }
    s.write_all(b"after the header\n").unwrap();
    let mut r = BufReader::new(s);
    let mut said = String::new();
    r.read_line(&mut said).unwrap();
    let mut echo = String::new();
    r.read_line(&mut echo).unwrap();
    assert_eq!(echo, "after the header\n", "backend said {said:?}");
    said.trim_end().to_string()
}

fn refused(lb: &Controlled, reason: &str) -> u64 {
    let (_, v) = ctl_json(&lb.sock, &["stats"]);
    v["listeners"][0]["refused"][reason].as_u64().unwrap_or(0)
}

/// What a refused client sees: the connection ends (EOF or reset) without a byte.
fn ends_without_a_byte(s: &mut TcpStream) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("got {n} bytes: {:?}", &b[..n]),
    }
    assert!(t.elapsed() < Duration::from_secs(4), "not closed");
    t.elapsed()
}

fn header_address_becomes_the_client(engine: &str) {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    let lb = start(engine, "any", backend.addr, "");
    let listen = lb.listen;
    // v1, the header and data in one segment.
    let mut one = b"PROXY TCP4 203.0.113.7 198.51.100.1 4444 443\r\n".to_vec();
    one.extend_from_slice(b"first bytes\n");
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&one).unwrap();
    let mut r = BufReader::new(s);
    let mut said = String::new();
    r.read_line(&mut said).unwrap();
    assert_eq!(said.trim_end(), "v1 203.0.113.7:4444 198.51.100.1:443");
    let mut echo = String::new();
    r.read_line(&mut echo).unwrap();
    assert_eq!(echo, "first bytes\n");
    // v1 split byte by byte at the start, then the rest.
    let h = b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 8443\r\n";
    assert_eq!(
        through(listen, &[&h[..1], &h[1..3], &h[3..20], &h[20..]]),
        "v1 [2001:db8::5]:5555 [2001:db8::1]:8443"
    );
    // v2 IPv4 with TLVs (authority, unique id), split inside the fixed part.
    let mut tlvs = vec![0x02, 0x00, 0x0b];
    tlvs.extend_from_slice(b"example.com");
    tlvs.extend_from_slice(&[0x05, 0x00, 0x02, 0xAB, 0xCD]);
    let h = v2_tcp4([192, 0, 2, 9], 1234, [192, 0, 2, 1], 80, &tlvs);
    assert_eq!(
        through(listen, &[&h[..7], &h[7..14], &h[14..]]),
        "v1 192.0.2.9:1234 192.0.2.1:80"
    );
    // v2 IPv6.
    let h = v2_tcp6("2001:db8::9".parse().unwrap(), 7, "2001:db8::2".parse().unwrap(), 443);
    assert_eq!(through(listen, &[&h]), "v1 [2001:db8::9]:7 [2001:db8::2]:443");
    // LOCAL (the balancer in front checking us): served with the connection's own address.
    let mut s = TcpStream::connect(listen).unwrap();
    let me = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&v2(0x20, 0x00, &[])).unwrap();
    let mut said = String::new();
    BufReader::new(s).read_line(&mut said).unwrap();
    assert_eq!(said.trim_end(), format!("v1 {me} {listen}"));
    // v1 UNKNOWN too.
    let mut s = TcpStream::connect(listen).unwrap();
    let me = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PROXY UNKNOWN\r\n").unwrap();
    let mut said = String::new();
    BufReader::new(s).read_line(&mut said).unwrap();
    assert_eq!(said.trim_end(), format!("v1 {me} {listen}"));
}

fn bad_headers_are_refused_and_counted(engine: &str) {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    let lb = start(engine, "v2", backend.addr, "");
    let listen = lb.listen;
    // Not from a trusted source: refused at once, before any byte.
    // (The reset can come before the connect call has returned.)
    match connect_from(listen, Some([127, 0, 0, 2].into())) {
        Ok(mut s) => {
            ends_without_a_byte(&mut s);
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    // A v1 header on a v2-only listener, and plain data: malformed.
    for bytes in [&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..], b"GET / HTTP/1.0\r\n\r\n"] {
        let mut s = TcpStream::connect(listen).unwrap();
        s.write_all(bytes).unwrap();
        ends_without_a_byte(&mut s);
    }
    // A v2 TLV longer than the header: malformed.
    let h = v2_tcp4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, &[0x04, 0x00, 0x09, 1]);
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(&h).unwrap();
    ends_without_a_byte(&mut s);
    // A v2 length over ringlb's bound: oversized, refused without reading it all.
    let mut h = SIG.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x20, 0x00]);
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(&h).unwrap();
    ends_without_a_byte(&mut s);
    // Half a header, then nothing: refused at proxy_header_timeout.
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(&SIG[..8]).unwrap();
    let waited = ends_without_a_byte(&mut s);
    assert!(
        waited >= Duration::from_millis(400),
        "closed after {waited:?}, before the timeout"
    );
    // Half a header, then the client's FIN.
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(&SIG[..5]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    ends_without_a_byte(&mut s);
    assert!(wait_until(Duration::from_secs(3), || {
        refused(&lb, "proxy_untrusted") == 1
            && refused(&lb, "proxy_malformed") == 3
            && refused(&lb, "proxy_oversized") == 1
            && refused(&lb, "proxy_timeout") == 1
            && refused(&lb, "client_closed") == 1
    }));
    let (_, v) = ctl_json(&lb.sock, &["stats"]);
    let l = &v["listeners"][0];
    assert_eq!(l["accepted"], 7, "{l}");
    assert_eq!(l["relayed"], 0, "{l}");
    assert_eq!(backend.accepted(), 0, "no backend connection for a refused client");
}

/// Per-source limits count the address in the header, not the balancer's.
fn admission_uses_the_header_address(engine: &str) {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    let lb = start(engine, "v1", backend.addr, "max_connections_per_source = 1\n");
    let open = |src: &str| {
        let mut s = TcpStream::connect(lb.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("PROXY TCP4 {src} 10.0.0.1 1000 80\r\n").as_bytes())
            .unwrap();
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap_or(0);
        (s, String::from_utf8_lossy(&b[..n]).into_owned())
    };
    // All from 127.0.0.1, but two clients by their headers: both served.
    let (_a, said_a) = open("10.9.0.1");
    let (_b, said_b) = open("10.9.0.2");
    assert!(said_a.starts_with("v1 10.9.0.1:1000"), "{said_a}");
    assert!(said_b.starts_with("v1 10.9.0.2:1000"), "{said_b}");
    // A second connection of 10.9.0.1 is over its limit.
    let (_c, said_c) = open("10.9.0.1");
    assert_eq!(said_c, "");
    assert!(wait_until(Duration::from_secs(2), || refused(&lb, "source_limit") == 1));
}

macro_rules! on_engines {
    ($($module:ident = $engine:literal),*) => {
        $( mod $module {
            #[test] fn header_address_becomes_the_client() { super::header_address_becomes_the_client($engine); }
            #[test] fn bad_headers_are_refused_and_counted() { super::bad_headers_are_refused_and_counted($engine); }
            #[test] fn admission_uses_the_header_address() { super::admission_uses_the_header_address($engine); }
        } )*
    };
}

on_engines!(uring = "uring", epoll = "epoll");

/// `accept_proxy` without `trusted_sources` is a config error naming the key.
#[test]
fn accept_proxy_needs_trusted_sources() {
    let dir = TempDir::new("ap");
    let path = dir.file(
        "bad.toml",
        "[[listener]]\nname = \"e\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\naccept_proxy = \"any\"\n\
         proxy_header_timeout = \"0s\"\n[[listener.route]]\nsni = \"bad..name\"\npool = \"nope\"\n\
         [[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:2\"\n",
    );
    let out = ringlb_cmd(&["check", "-c", path_str(&path)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        "listener \"e\": trusted_sources: required with accept_proxy",
        "listener \"e\": proxy_header_timeout: must be more than 0",
        "listener \"e\": route 1: sni: \"bad..name\"",
        "listener \"e\": route 1: pool: no pool named \"nope\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
