//! The JSON access log (`[control] access_log = "json"`): one object per
//! closed TCP connection and expired UDP flow, checked field by field
//! against what the clients did, on both engines; the file is reopened on
//! SIGUSR1 (logrotate).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    addr
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// Echo `n` bytes over one connection (after the backend's tag line), then close it.
fn echo(to: SocketAddr, n: usize) -> SocketAddr {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = s.local_addr().unwrap();
    let data = vec![b'x'; n];
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; n + 2];
    s.read_exact(&mut back).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    me
}

fn find<'a>(all: &'a [Value], key: &str, want: &str) -> &'a Value {
    all.iter()
        .find(|v| v[key] == want)
        .unwrap_or_else(|| panic!("no record with {key} = {want} in {all:#?}"))
}

fn records_match_what_clients_did(engine: &str) {
    // It writes "t\n" first, so bytes down = bytes up + 2.
    let tcp_backend = Backend::start("t", Behaviour::TagEcho);
    let udp_backend = udp_echo();
    let (_refusing, refusing) = refusing_addr();
    let dir = TempDir::new("alog");
    let log = dir.0.join("access.log");
    let (web, dead, edge, udp) = (lb_addr(), lb_addr(), lb_addr(), lb_addr());
    let body = format!(
        "[control]\nsocket = \"{sock}\"\naccess_log = \"json\"\naccess_log_file = \"{log}\"\n\n\
         [[listener]]\nname = \"web\"\nbind = \"{web}\"\npool = \"echo\"\nidle_timeout = \"1500ms\"\n\
         [[listener]]\nname = \"dead\"\nbind = \"{dead}\"\npool = \"dead\"\nconnect_attempts = 1\n\
         [[listener]]\nname = \"edge\"\nbind = \"{edge}\"\npool = \"echo\"\naccept_proxy = \"v1\"\ntrusted_sources = [\"127.0.0.1\"]\n\
         [[listener.route]]\nsni = \"db.example.com\"\npool = \"echo2\"\n\
         [[listener]]\nname = \"game\"\nbind = \"{udp}\"\nprotocol = \"udp\"\npool = \"game\"\nidle_timeout = \"500ms\"\n\n\
         [[pool]]\nname = \"echo\"\n[[pool.backend]]\naddr = \"{t}\"\n\
         [[pool]]\nname = \"echo2\"\n[[pool.backend]]\naddr = \"{t}\"\n\
         [[pool]]\nname = \"dead\"\n[[pool.backend]]\naddr = \"{refusing}\"\n\
         [[pool]]\nname = \"game\"\n[[pool.backend]]\naddr = \"{udp_backend}\"\n",
        sock = dir.0.join("ctl.sock").display(),
        log = log.display(),
        t = tcp_backend.addr,
    );
    let cfg = format!("[runtime]\nworkers = 2\nio_engine = \"{engine}\"\nshutdown_timeout = \"1s\"\n\n{body}");
    let mut lb = Ringlb::start(&cfg, web);
    // Three connections of different sizes.
    let sizes = [1usize, 1000, 70_000];
    let clients: Vec<SocketAddr> = sizes.iter().map(|&n| echo(web, n)).collect();
    // One left idle: closed by the idle timeout (1.5 s: a shorter one could
    // close a busy connection on a machine stalled by other load).
    let idle = TcpStream::connect(web).unwrap();
    let idle_addr = idle.local_addr().unwrap();
    // One refused: its only backend refuses the connect.
    let mut r = TcpStream::connect(dead).unwrap();
    let refused_addr = r.local_addr().unwrap();
    let _ = r.read(&mut [0u8; 1]);
    // Through a PROXY header, to an SNI route.
    let mut hello = b"PROXY TCP4 198.51.100.7 198.51.100.1 5151 443\r\n".to_vec();
    let ch = client_hello(b"db.example.com");
    hello.extend_from_slice(&ch);
    let mut e = TcpStream::connect(edge).unwrap();
    e.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    e.write_all(&hello).unwrap();
    let mut back = vec![0u8; ch.len() + 2];
    e.read_exact(&mut back).unwrap();
    drop(e);
    // A UDP flow of 3 datagrams each way, then idle.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let udp_client = u.local_addr().unwrap();
    for len in [10, 20, 30] {
        u.send_to(&vec![1u8; len], udp).unwrap();
        let mut b = [0u8; 64];
        assert_eq!(u.recv(&mut b).unwrap(), len);
    }
    assert!(
        wait_until(Duration::from_secs(10), || lines(&log).len() >= 7),
        "{:#?}",
        lines(&log)
    );
    drop(idle);
    let all = lines(&log);
    assert_eq!(all.len(), 7, "{all:#?}");
    for (addr, n) in clients.iter().zip(sizes) {
        let v = find(&all, "client", &addr.to_string());
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["listener"], "web");
        assert_eq!(v["pool"], "echo");
        assert_eq!(v["backend"], tcp_backend.addr.to_string());
        assert_eq!(v["bytes_up"], n as u64, "{v}");
        assert_eq!(v["bytes_down"], n as u64 + 2, "{v}");
        assert_eq!(v["end"], "done", "{v}");
        assert_eq!(v["attempts"], 1);
        assert!(v["connect_ms"].as_f64().unwrap() >= 0.0);
        assert!(
            v["duration_ms"].as_f64().unwrap() >= v["connect_ms"].as_f64().unwrap(),
            "{v}"
        );
        assert!(v["sni"].is_null() && v["reason"].is_null(), "{v}");
        let t = v["time"].as_f64().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(t <= now && t > now - 60.0, "{v}");
    }
    let v = find(&all, "client", &idle_addr.to_string());
    assert_eq!(v["end"], "idle_timeout", "{v}");
    assert!(v["duration_ms"].as_f64().unwrap() >= 1400.0, "{v}");
    let v = find(&all, "client", &refused_addr.to_string());
    assert_eq!(
        (v["end"].as_str(), v["reason"].as_str()),
        (Some("refused"), Some("connect_failed")),
        "{v}"
    );
    assert_eq!(v["listener"], "dead");
    assert!(v["backend"].is_null() && v["connect_ms"].is_null(), "{v}");
    assert_eq!(v["attempts"], 1);
    let v = find(&all, "client", "198.51.100.7:5151");
    assert_eq!(v["listener"], "edge");
    assert_eq!(v["pool"], "echo2", "{v}");
    assert_eq!(v["sni"], "db.example.com", "{v}");
    assert_eq!(
        v["bytes_up"],
        ch.len() as u64,
        "the PROXY header is not the client's: {v}"
    );
    assert_eq!(v["bytes_down"], ch.len() as u64 + 2, "{v}");
    let v = find(&all, "client", &udp_client.to_string());
    assert_eq!(v["proto"], "udp");
    assert_eq!(v["listener"], "game");
    assert_eq!(v["backend"], udp_backend.to_string());
    assert_eq!(
        (v["datagrams_up"].as_u64(), v["datagrams_down"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
    assert_eq!(
        (v["bytes_up"].as_u64(), v["bytes_down"].as_u64()),
        (Some(60), Some(60)),
        "{v}"
    );
    assert_eq!(v["end"], "idle_timeout");

    // logrotate: move the file, SIGUSR1, and the next record goes to a new file.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    lb.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    let after = echo(web, 5);
    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len() == 1),
        "no new file"
    );
    assert_eq!(lines(&log)[0]["client"], after.to_string());
    assert_eq!(lines(&rotated).len(), 7, "the old file keeps its lines");
    let (_, stats) = ctl_json(&dir.0.join("ctl.sock"), &["stats"]);
    assert_eq!(stats["access_log"]["written"], 8, "{stats}");
    assert_eq!(stats["access_log"]["dropped"], 0, "{stats}");
    // What is still queued at a stop is written before the exit.
    let last = echo(web, 3);
    lb.signal(libc::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        lines(&log).iter().any(|v| v["client"] == last.to_string()),
        "{:#?}",
        lines(&log)
    );
}

#[test]
fn records_match_what_clients_did_uring() {
    records_match_what_clients_did("uring");
}

#[test]
fn records_match_what_clients_did_epoll() {
    records_match_what_clients_did("epoll");
}

/// A bad access_log value is an error naming the key.
#[test]
fn bad_access_log_values_are_errors() {
    let dir = TempDir::new("alog-bad");
    let path = dir.file(
        "bad.toml",
        "[control]\naccess_log = \"xml\"\n[[listener]]\nname = \"e\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n\
         [[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:2\"\n",
    );
    let out = ringlb_cmd(&["check", "-c", path_str(&path)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("control.access_log: \"xml\": expected off, text or json"),
        "{err}"
    );
}
