//! Balancing rules (least_conn, random_two, Maglev with bounded loads),
//! sessions on a failover (on_down, on_up) and backup tiers, through the
//! real binary on both io engines with long-lived loopback connections.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const ENGINES: [&str; 2] = ["uring", "epoll"];

/// A running ringlb with listener "web" on pool "web" and a metrics port.
struct Lb {
    c: Running,
    metrics: SocketAddr,
}

/// The process, its control socket and listener (the directory lives as long).
struct Running {
    _lb: Ringlb,
    sock: std::path::PathBuf,
    listen: SocketAddr,
    _dir: TempDir,
}

/// `backends`: (address, extra lines of its `[[pool.backend]]`).
fn start(engine: &str, listener_extra: &str, pool_extra: &str, backends: &[(SocketAddr, &str)]) -> Lb {
    let listen = lb_addr();
    let metrics = lb_addr();
    let mut body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nconnect_timeout = \"500ms\"\n{listener_extra}\n\n[[pool]]\nname = \"web\"\n{pool_extra}\n"
    );
    for (b, extra) in backends {
        body.push_str(&format!("[[pool.backend]]\naddr = \"{b}\"\n{extra}\n"));
    }
    let dir = TempDir::new("balance");
    let sock = dir.0.join("ctl.sock");
    let cfg = config_with_control(engine, &sock, &body)
        .replace("[control]\n", &format!("[control]\nmetrics = \"{metrics}\"\n"));
    // The metrics port comes up with the listeners; a UDP listener has no
    // accept to wait for (the UDP test retries its first datagram).
    let mut lb = Ringlb::start(&cfg, metrics);
    if !listener_extra.contains("udp") {
        lb.wait_listening(listen);
    }
    Lb {
        c: Running {
            _lb: lb,
            sock,
            listen,
            _dir: dir,
        },
        metrics,
    }
}

impl Lb {
    fn metrics(&self) -> String {
        let mut c = TcpStream::connect(self.metrics).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    }
}

/// A long-lived connection and the tag of the backend it reached.
fn open(lb: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect_timeout(&lb, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            other => panic!("no tag line: {other:?} after {:?}", String::from_utf8_lossy(&line)),
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

fn counts(conns: &[(TcpStream, String)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, tag) in conns {
        *m.entry(tag.clone()).or_default() += 1;
    }
    m
}

/// Waits up to `limit` for the peer to end `s` (EOF or reset); how long it took.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 64];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// Whether `s` still relays: an echo round trip.
fn alive(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

// === least_conn, random_two ===

#[test]
fn least_conn_spreads_long_lived_connections_within_one_of_even_by_weight() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect();
    for engine in ENGINES {
        // hash_key = "src_ip": every connection of this one client hashes
        // alike, so Maglev alone would put them all on one backend.
        let lb = start(
            engine,
            "hash_key = \"src_ip\"",
            "balance = \"least_conn\"",
            &[
                (backends[0].addr, "weight = 1"),
                (backends[1].addr, "weight = 1"),
                (backends[2].addr, "weight = 2"),
            ],
        );
        let conns: Vec<_> = (0..24).map(|_| open(lb.c.listen)).collect();
        let m = counts(&conns);
        println!("{engine}: least_conn, weights 1:1:2, 24 connections: {m:?}");
        for (tag, want) in [("a", 6), ("b", 6), ("c", 12)] {
            let got = m.get(tag).copied().unwrap_or(0);
            assert!(
                got.abs_diff(want) <= 1,
                "{engine}: {tag} has {got}, want {want} ± 1: {m:?}"
            );
        }
        // Close b's connections: the next ones go to b until it is even again.
        let (b_conns, mut rest): (Vec<_>, Vec<_>) = conns.into_iter().partition(|(_, t)| t == "b");
        drop(b_conns);
        assert!(wait_until(Duration::from_secs(3), || {
            backend_info(&lb.c.sock, "web", backends[1].addr)["active"] == 0
        }));
        for _ in 0..6 {
            rest.push(open(lb.c.listen));
        }
        let m = counts(&rest);
        assert!(
            m.get("b").copied().unwrap_or(0).abs_diff(6) <= 1,
            "{engine}: refilled b: {m:?}"
        );
        let (_, route) = ctl_json(&lb.c.sock, &["route", "web", "127.0.0.1"]);
        assert_eq!(route["rule"], "least_conn", "{route}");
    }
}

#[test]
fn random_two_spreads_long_lived_connections() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect();
    for engine in ENGINES {
        let lb = start(
            engine,
            "hash_key = \"src_ip\"",
            "balance = \"random_two\"",
            &backends.iter().map(|b| (b.addr, "")).collect::<Vec<_>>(),
        );
        let conns: Vec<_> = (0..30).map(|_| open(lb.c.listen)).collect();
        let m = counts(&conns);
        println!("{engine}: random_two, 30 connections over 3: {m:?}");
        for tag in ["a", "b", "c"] {
            let got = m.get(tag).copied().unwrap_or(0);
            // Two choices keep the spread tight (a one-sided pick would put
            // all 30 on one backend, as Maglev on one source address does).
            assert!((5..=15).contains(&got), "{engine}: {tag} has {got}: {m:?}");
        }
        let (_, route) = ctl_json(&lb.c.sock, &["route", "web", "127.0.0.1"]);
        assert_eq!(route["rule"], "random_two", "{route}");
    }
}

/// A UDP backend thread answering each datagram with its tag; ends on drop.
struct UdpTag {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpTag {
    fn start(tag: &'static str) -> UdpTag {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(tag.as_bytes(), from);
                }
            }
        });
        UdpTag { addr, stop }
    }
}

impl Drop for UdpTag {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn udp_flows_take_the_same_least_conn_choice_at_flow_creation() {
    let backends = [UdpTag::start("a"), UdpTag::start("b"), UdpTag::start("c")];
    for engine in ENGINES {
        let lb = start(
            engine,
            "protocol = \"udp\"\nhash_key = \"src_ip\"",
            "balance = \"least_conn\"",
            &backends.iter().map(|b| (b.addr, "")).collect::<Vec<_>>(),
        );
        // Each client socket is one flow (a new source port), one source IP.
        let mut m: HashMap<String, usize> = HashMap::new();
        let mut clients = Vec::new();
        for _ in 0..12 {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 64];
            let tag = (0..10)
                .find_map(|_| {
                    c.send_to(b"hi", lb.c.listen).unwrap();
                    c.recv(&mut buf)
                        .ok()
                        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                })
                .expect("a reply through ringlb");
            *m.entry(tag).or_default() += 1;
            clients.push(c);
        }
        println!("{engine}: udp least_conn, 12 flows from one address: {m:?}");
        for tag in ["a", "b", "c"] {
            let got = m.get(tag).copied().unwrap_or(0);
            assert!(got.abs_diff(4) <= 1, "{engine}: {tag} has {got}: {m:?}");
        }
    }
}

// === bounded loads ===

#[test]
fn bounded_loads_stop_one_hot_source_piling_onto_one_backend() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, "")).collect();
    for engine in ENGINES {
        // Without the factor: one source, one backend.
        let plain = start(engine, "hash_key = \"src_ip\"", "", &list);
        let conns: Vec<_> = (0..20).map(|_| open(plain.c.listen)).collect();
        let m = counts(&conns);
        println!("{engine}: maglev, one source, 20 connections: {m:?}");
        assert_eq!(
            m.len(),
            1,
            "{engine}: plain Maglev keeps one source on one backend: {m:?}"
        );
        drop(conns);
        drop(plain);

        let lb = start(engine, "hash_key = \"src_ip\"", "hash_balance_factor = 125", &list);
        let conns: Vec<_> = (0..20).map(|_| open(lb.c.listen)).collect();
        let m = counts(&conns);
        println!("{engine}: maglev + hash_balance_factor 125, one source, 20 connections: {m:?}");
        // Each backend stays under 125% of the average counting the new
        // connection: at most ceil(1.25 * 20 / 3) = 9.
        let max = m.values().copied().max().unwrap();
        assert!(max <= 9, "{engine}: {m:?}");
        assert_eq!(m.len(), 3, "{engine}: {m:?}");
        // The first choice is still the key's own Maglev backend.
        let (_, route) = ctl_json(&lb.c.sock, &["route", "web", "127.0.0.1"]);
        assert_eq!(route["rule"], "maglev+bounded", "{route}");
        let (code, text, _) = ctl_text(&lb.c.sock, &["route", "web", "127.0.0.1"]);
        assert_eq!(code, 0);
        assert!(text.contains("rule    maglev+bounded"), "{text}");
        // The walk is deterministic: the key's first backend fills to its
        // bound, then the second, then the third (9, 8, 3 after 20). A 21st
        // connection's bound is 1.25 x 21 / 3 = 8.75: the first is skipped.
        let mut sorted: Vec<usize> = m.values().copied().collect();
        sorted.sort();
        assert_eq!(sorted, [3, 8, 9], "{engine}: {m:?}");
        let skipped = route["skipped"].as_array().unwrap();
        assert_eq!(skipped.len(), 1, "{route}");
        assert_eq!(skipped[0]["why"], "over load bound: 9 open >= 8.75", "{route}");
        assert_ne!(route["chosen"], skipped[0]["addr"], "{route}");
        assert!(text.contains("over load bound: 9 open >= 8.75"), "{text}");
        drop(conns);
    }
}

// === sessions on a failover, backup tiers ===

const CHECK: &str = "[pool.health_check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2\njitter = \"0s\"\n";

#[test]
fn on_down_close_ends_a_dead_primarys_sessions_and_on_up_close_backups_ends_the_backups() {
    for engine in ENGINES {
        let a = Backend::start("a", Behaviour::TagEcho);
        let k = Backend::start("k", Behaviour::TagEcho);
        let a_addr = a.addr;
        let lb = start(
            engine,
            "",
            &format!(
                "on_down = \"close\"\non_up = \"close_backups\"\n[pool.outlier]\nconsecutive_failures = 0\n{CHECK}"
            ),
            &[(a.addr, ""), (k.addr, "backup = true")],
        );
        // Only the primary takes connections while it is usable.
        let mut conns: Vec<_> = (0..5).map(|_| open(lb.c.listen)).collect();
        assert_eq!(counts(&conns), HashMap::from([("a".to_string(), 5)]), "{engine}");
        let (_, b) = ctl_json(&lb.c.sock, &["backends", "web"]);
        let tiers: Vec<_> = b["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["tier"].clone())
            .collect();
        assert_eq!(tiers, ["primary", "backup"], "{b}");

        // The primary stops answering: its listening port refuses, while the
        // connections it has stay open on its side (a demoted server).
        drop(a);
        let down_at = Instant::now();
        let limit = Duration::from_millis(2 * 200 + 200 + 1500);
        for (s, _) in &mut conns {
            let t = wait_closed(s, limit);
            assert!(t.is_some(), "{engine}: a connection to the dead primary stayed open");
        }
        let closed_after = down_at.elapsed();
        println!("{engine}: primary down -> its 5 sessions closed after {closed_after:?} (bound: fall 2 x interval 200ms + timeout 200ms = 600ms, + a 100 ms tick)");
        assert!(closed_after <= limit, "{engine}: {closed_after:?}");
        // New connections reach the backup.
        let mut on_backup: Vec<_> = (0..3).map(|_| open(lb.c.listen)).collect();
        assert_eq!(counts(&on_backup), HashMap::from([("k".to_string(), 3)]), "{engine}");
        let (_, route) = ctl_json(&lb.c.sock, &["route", "web", "127.0.0.1:5000"]);
        assert_eq!(route["rule"], "maglev (backup tier)", "{route}");
        let body = lb.metrics();
        assert!(
            body.contains(&format!(
                "ringlb_backend_sessions_closed_total{{pool=\"web\",backend=\"{a_addr}\",reason=\"down\"}} 5"
            )),
            "{engine}: {body}"
        );

        // The primary returns: the backup's sessions are closed, new ones go to it.
        let a = Backend::start_on(a_addr, "a", Behaviour::TagEcho);
        let up_at = Instant::now();
        for (s, _) in &mut on_backup {
            assert!(
                wait_closed(s, Duration::from_secs(3)).is_some(),
                "{engine}: a backup session stayed open"
            );
        }
        println!(
            "{engine}: primary back -> 3 backup sessions closed after {:?} (rise 1 x interval 200ms)",
            up_at.elapsed()
        );
        let back: Vec<_> = (0..3).map(|_| open(lb.c.listen)).collect();
        assert_eq!(counts(&back), HashMap::from([("a".to_string(), 3)]), "{engine}");
        let body = lb.metrics();
        assert!(
            body.contains(&format!(
                "ringlb_backend_sessions_closed_total{{pool=\"web\",backend=\"{}\",reason=\"primary_up\"}} 3",
                k.addr
            )),
            "{engine}: {body}"
        );
        drop(a);
    }
}

#[test]
fn on_down_close_on_ctl_disable_and_keep_by_default() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    for engine in ENGINES {
        for (on_down, closes) in [("close", true), ("keep", false)] {
            let lb = start(
                engine,
                "hash_key = \"src_ip\"",
                &format!("on_down = \"{on_down}\"\ndrain_timeout = \"30s\""),
                &[(a.addr, ""), (b.addr, "")],
            );
            let (mut s, tag) = open(lb.c.listen);
            let target = if tag == "a" { a.addr } else { b.addr };
            let t0 = Instant::now();
            let (code, out, err) = ctl_text(&lb.c.sock, &["disable", "web", &target.to_string()]);
            assert_eq!(code, 0, "{out}{err}");
            if closes {
                let t = wait_closed(&mut s, Duration::from_secs(2));
                assert!(
                    t.is_some(),
                    "{engine}: disable with on_down = close left the session open"
                );
                println!("{engine}: ctl disable -> session closed after {:?}", t0.elapsed());
                let (_, other) = open(lb.c.listen);
                assert_ne!(other, tag, "{engine}: the new connection went elsewhere");
            } else {
                std::thread::sleep(Duration::from_millis(300));
                assert!(alive(&mut s), "{engine}: on_down = keep closed a session");
            }
        }
    }
}

#[test]
fn backups_serve_only_while_no_primary_is_usable_and_deterministically() {
    let p1 = Backend::start("p1", Behaviour::TagEcho);
    let p2 = Backend::start("p2", Behaviour::TagEcho);
    let k1 = Backend::start("k1", Behaviour::TagEcho);
    let k2 = Backend::start("k2", Behaviour::TagEcho);
    let engine = "auto";
    let lb = start(
        engine,
        "hash_key = \"src_ip_port\"",
        "",
        &[
            (p1.addr, ""),
            (p2.addr, ""),
            (k1.addr, "backup = true"),
            (k2.addr, "backup = true"),
        ],
    );
    let tags = |n: usize| {
        let conns: Vec<_> = (0..n).map(|_| open(lb.c.listen)).collect();
        counts(&conns)
    };
    let m = tags(20);
    assert!(m.keys().all(|t| t.starts_with('p')), "backups wait: {m:?}");
    assert!(ctl_text(&lb.c.sock, &["disable", "web", &p1.addr.to_string()]).0 == 0);
    let m = tags(10);
    assert_eq!(
        m,
        HashMap::from([("p2".to_string(), 10)]),
        "one primary left serves alone"
    );
    assert!(ctl_text(&lb.c.sock, &["disable", "web", &p2.addr.to_string()]).0 == 0);
    let m = tags(20);
    assert!(
        m.keys().all(|t| t.starts_with('k')) && m.len() == 2,
        "all primaries out: both backups: {m:?}"
    );
    let (_, b) = ctl_json(&lb.c.sock, &["backends", "web"]);
    assert_eq!(b["pools"][0]["backup_tier"], true, "{b}");
    let (_, text, _) = ctl_text(&lb.c.sock, &["backends", "web"]);
    assert!(text.contains("BACKUPS SERVE") && text.contains("backup "), "{text}");
    // Determinism: a client address maps to the same backup every time, and
    // to what `ctl route` says.
    for port in [40001u16, 40002, 40003, 40004] {
        let (_, r1) = ctl_json(&lb.c.sock, &["route", "web", &format!("127.0.0.1:{port}")]);
        let (_, r2) = ctl_json(&lb.c.sock, &["route", "web", &format!("127.0.0.1:{port}")]);
        assert_eq!(r1["chosen"], r2["chosen"]);
        assert_eq!(r1["rule"], "maglev (backup tier)", "{r1}");
        let chosen = r1["chosen"].as_str().unwrap().to_string();
        assert!(chosen == k1.addr.to_string() || chosen == k2.addr.to_string(), "{r1}");
    }
    assert!(ctl_text(&lb.c.sock, &["enable", "web", &p2.addr.to_string()]).0 == 0);
    let m = tags(10);
    assert_eq!(
        m,
        HashMap::from([("p2".to_string(), 10)]),
        "a primary back: backups stop"
    );
}

// === validation: file, reload ===

#[test]
fn bad_balance_keys_never_start_and_never_replace_the_running_config() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let lb = start(
        "auto",
        "hash_key = \"src_ip\"",
        "balance = \"least_conn\"",
        &[(a.addr, ""), (b.addr, "")],
    );
    let good = std::fs::read_to_string(&lb.c._lb.config).unwrap();
    let cases = [
        (
            "balance = \"least_conn\"",
            "balance = \"leastconn\"",
            "pool \"web\": balance: \"leastconn\": expected",
        ),
        (
            "balance = \"least_conn\"",
            "hash_balance_factor = 100",
            "pool \"web\": hash_balance_factor: 100 is out of range",
        ),
        (
            "balance = \"least_conn\"",
            "balance = \"random_two\"\nhash_balance_factor = 125",
            "pool \"web\": hash_balance_factor: only applies to balance = \"maglev\"",
        ),
        (
            "balance = \"least_conn\"",
            "on_down = \"shutdown\"",
            "pool \"web\": on_down: \"shutdown\": expected",
        ),
        (
            "balance = \"least_conn\"",
            "on_up = \"close\"",
            "pool \"web\": on_up: \"close\": expected",
        ),
    ];
    for (from, to, problem) in cases {
        let bad = good.replace(from, to);
        // `ringlb check` (what a start runs) refuses it, naming the file.
        let dir = TempDir::new("badbal");
        let path = dir.file("bad.toml", &bad);
        let out = ringlb_cmd(&["check", "-c", path_str(&path)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{to}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: {problem}", path.display())),
            "{to}: {stderr}"
        );
        // A reload refuses it and keeps serving with least_conn.
        std::fs::write(&lb.c._lb.config, &bad).unwrap();
        let (code, v) = ctl_json(&lb.c.sock, &["reload"]);
        assert_eq!(code, 1, "{to}: {v}");
        assert!(v["error"].as_str().unwrap().contains(problem), "{to}: {v}");
        assert_eq!(ctl_json(&lb.c.sock, &["status"]).1["config_generation"], 1, "{to}");
        let (_, route) = ctl_json(&lb.c.sock, &["route", "web", "127.0.0.1"]);
        assert_eq!(route["rule"], "least_conn", "{to}: {route}");
    }
    std::fs::write(&lb.c._lb.config, &good).unwrap();
}
