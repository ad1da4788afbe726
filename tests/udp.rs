//! UDP balancing through the real binary, on both io engines.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

/// A UDP backend: replies `payload|tag` to small datagrams and the payload
/// itself to large ones (so a 65,507-byte datagram can come back whole).
struct UdpBackend {
    addr: SocketAddr,
    tag: String,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpBackend {
    fn start(tag: &str) -> UdpBackend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tag)
    }

    fn start_on(addr: SocketAddr, tag: &str) -> UdpBackend {
        let socket = UdpSocket::bind(addr).unwrap();
        // Bursts through ringlb arrive faster than one thread answers them;
        // a roomy receive queue keeps this test backend from dropping them.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20);
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
                let mut reply = buf[..n].to_vec();
                if n <= 1000 {
                    reply.extend_from_slice(format!("|{t}").as_bytes());
                }
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

struct Lb {
    lb: Ringlb,
    listen: SocketAddr,
    sock: PathBuf,
    _dir: TempDir,
}

fn start(engine: &str, workers: usize, backends: &[(SocketAddr, u32)], listener_extra: &str, pool_extra: &str) -> Lb {
    let dir = TempDir::new("udp");
    let sock = dir.0.join("ctl.sock");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = format!(
        "[runtime]\nworkers = {workers}\nio_engine = \"{engine}\"\nshutdown_timeout = \"1s\"\n[control]\nsocket = \"{}\"\n\n[[listener]]\nname = \"u\"\nbind = \"{listen}\"\nprotocol = \"udp\"\npool = \"p\"\n{listener_extra}\n\n[[pool]]\nname = \"p\"\n{pool_extra}\n",
        sock.display()
    );
    for (a, w) in backends {
        cfg.push_str(&format!("[[pool.backend]]\naddr = \"{a}\"\nweight = {w}\n"));
    }
    let dir2 = TempDir::new("udpcfg");
    let path = dir2.file("c.toml", &cfg);
    let mut child = std::process::Command::new(ringlb_bin());
    child
        .args(["run", "-c", path_str(&path)])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    let child = child.spawn().unwrap();
    let lb = Ringlb {
        child,
        dir: dir2,
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

fn client() -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c
}

/// Sends `msg` and returns the tag of the backend that answered.
fn ask(c: &UdpSocket, to: SocketAddr, msg: &str) -> Option<String> {
    c.send_to(msg.as_bytes(), to).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = c.recv_from(&mut buf).ok()?;
    assert_eq!(from, to, "reply must come from the listener's address");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (echo, tag) = text.rsplit_once('|').expect("tagged reply");
    assert_eq!(echo, msg, "reply to this flow's datagram");
    Some(tag.to_string())
}

/// Every datagram that opened a flow or was refused has one outcome:
/// `accepted = relayed + Σ refused`, as for TCP connections.
fn assert_one_outcome_each(stats: &serde_json::Value) {
    let l = &stats["listeners"][0];
    let refused: u64 = l["refused"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        l["accepted"].as_u64().unwrap(),
        l["relayed"].as_u64().unwrap() + refused,
        "accepted = relayed + refused: {l}"
    );
}

fn flows_spread_by_weight(engine: &str) {
    let bs: Vec<UdpBackend> = ["a", "b", "c"].iter().map(|t| UdpBackend::start(t)).collect();
    let weights = [1u32, 1, 2];
    let pairs: Vec<_> = bs.iter().zip(weights).map(|(b, w)| (b.addr, w)).collect();
    let lb = start(engine, 2, &pairs, "", "");
    const N: usize = 2000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..N {
        let c = client();
        *counts
            .entry(ask(&c, lb.listen, &format!("hello {i}")).expect("reply"))
            .or_default() += 1;
    }
    for (b, w) in bs.iter().zip(weights) {
        let share = counts.get(&b.tag).copied().unwrap_or(0) as f64 / N as f64;
        let want = w as f64 / 4.0;
        assert!(
            (share - want).abs() <= 0.15 * want,
            "{}: {share:.3} vs {want:.3}: {counts:?}",
            b.tag
        );
    }
}

fn flow_keeps_its_backend_for_1000_datagrams(engine: &str) {
    let bs: Vec<UdpBackend> = ["a", "b", "c"].iter().map(|t| UdpBackend::start(t)).collect();
    let pairs: Vec<_> = bs.iter().map(|b| (b.addr, 1)).collect();
    let lb = start(engine, 2, &pairs, "hash_key = \"src_ip_port\"", "");
    let c = client();
    let first = ask(&c, lb.listen, "0").unwrap();
    for i in 1..1000 {
        assert_eq!(ask(&c, lb.listen, &i.to_string()).unwrap(), first, "datagram {i} moved");
    }
    // Adding a backend (a table change) does not move the live flow.
    let d = UdpBackend::start("d");
    assert_eq!(
        ctl_json(&lb.sock, &["add", "p", &d.addr.to_string(), "--weight", "10"]).0,
        0
    );
    for i in 0..100 {
        assert_eq!(ask(&c, lb.listen, &format!("after {i}")).unwrap(), first);
    }
}

fn replies_reach_the_right_flow_with_200_concurrent_flows(engine: &str) {
    let bs: Vec<UdpBackend> = ["a", "b"].iter().map(|t| UdpBackend::start(t)).collect();
    let pairs: Vec<_> = bs.iter().map(|b| (b.addr, 1)).collect();
    let lb = start(engine, 2, &pairs, "", "");
    let clients: Vec<UdpSocket> = (0..200).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(format!("flow-{i}").as_bytes(), lb.listen).unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        let mut buf = [0u8; 128];
        let n = c.recv(&mut buf).unwrap_or_else(|e| panic!("flow {i}: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with(&format!("flow-{i}|")), "flow {i} got {text:?}");
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn idle_flows_expire_and_close_their_sockets(engine: &str) {
    let b = UdpBackend::start("a");
    // Long enough that all 50 flows are open at once even on a slow machine.
    let lb = start(engine, 2, &[(b.addr, 1)], "idle_timeout = \"2s\"", "");
    // Let the control connection of start()'s readiness check close first.
    thread::sleep(Duration::from_millis(300));
    let baseline = fd_count(lb.lb.pid());
    let clients: Vec<UdpSocket> = (0..50).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        assert!(ask(c, lb.listen, &i.to_string()).is_some());
    }
    let open = fd_count(lb.lb.pid());
    assert!(open >= baseline + 50, "one socket per flow: {baseline} -> {open}");
    assert!(
        wait_until(Duration::from_secs(6), || fd_count(lb.lb.pid()) <= baseline),
        "fds back to baseline {baseline}"
    );
    let stats = ctl_json(&lb.sock, &["stats"]).1;
    assert_eq!(stats["listeners"][0]["active"], 0, "{stats}");
    // An expired flow's client is simply a new flow next time.
    assert!(ask(&clients[0], lb.listen, "again").is_some());
}

fn full_flow_table_drops_new_flows_only(engine: &str) {
    let b = UdpBackend::start("a");
    let lb = start(engine, 1, &[(b.addr, 1)], "max_flows = 3", "");
    let old: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
    for (i, c) in old.iter().enumerate() {
        assert!(ask(c, lb.listen, &format!("old {i}")).is_some());
    }
    let newcomer = client();
    newcomer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(ask(&newcomer, lb.listen, "new").is_none(), "a 4th flow is dropped");
    for (i, c) in old.iter().enumerate() {
        assert!(
            ask(c, lb.listen, &format!("old again {i}")).is_some(),
            "existing flow {i} unaffected"
        );
    }
    let stats = ctl_json(&lb.sock, &["stats"]).1;
    assert!(
        stats["listeners"][0]["refused"]["flow_table_full"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_one_outcome_each(&stats);
}

fn backend_going_down_moves_its_flows_on_the_next_datagram(engine: &str) {
    let a = UdpBackend::start("a");
    let b = UdpBackend::start("b");
    let check = "[pool.health_check]\nkind = \"udp_send_expect\"\nsend = \"probe\"\nexpect = \"probe|\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 1\n";
    let lb = start(
        engine,
        2,
        &[(a.addr, 1), (b.addr, 1)],
        "",
        &format!("panic_threshold = 0\n{check}"),
    );
    // Find a client whose flow is on a.
    let (c, _) = (0..100)
        .map(|_| {
            let c = client();
            let tag = ask(&c, lb.listen, "hi").unwrap();
            (c, tag)
        })
        .find(|(_, t)| t == "a")
        .expect("a flow on a");
    let a_addr = a.addr;
    drop(a);
    assert!(wait_until(Duration::from_secs(3), || backend_info(
        &lb.sock, "p", a_addr
    )["state"]
        == "down"));
    assert_eq!(
        ask(&c, lb.listen, "moved?").as_deref(),
        Some("b"),
        "the next datagram re-picks"
    );
    let _keep = b;
}

/// A UDP address that answers every datagram with ICMP port unreachable for
/// as long as the returned socket lives: the port is held by a socket
/// connected elsewhere, so nothing receives there.
fn unreachable_udp_addr() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect("127.0.0.1:9").unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

fn icmp_unreachable_ejects_the_backend_and_its_flows_move(engine: &str) {
    let good = UdpBackend::start("good");
    let (_guard, dead) = unreachable_udp_addr();
    let lb = start(
        engine,
        2,
        &[(good.addr, 1), (dead, 1)],
        "",
        "panic_threshold = 0\n[pool.outlier]\nconsecutive_failures = 3\nejection_time = \"30s\"\n",
    );
    let clients: Vec<UdpSocket> = (0..16).map(|_| client()).collect();
    // Each flow on the dead backend learns of the ICMP error on its next send.
    for round in 0..5 {
        for c in &clients {
            c.send_to(format!("r{round}").as_bytes(), lb.listen).unwrap();
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_until(Duration::from_secs(3), || backend_info(&lb.sock, "p", dead)["state"]
            == "ejected"),
        "{}",
        backend_info(&lb.sock, "p", dead)
    );
    // Drain the replies to the rounds: the flows on the dead backend missed
    // some (until it was ejected and they moved).
    let mut unanswered = 0;
    for c in &clients {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let mut replies = 0;
        while c.recv(&mut buf).is_ok() {
            replies += 1;
        }
        if replies < 5 {
            unanswered += 1;
        }
        c.set_nonblocking(false).unwrap();
    }
    assert!(unanswered >= 1, "no flow landed on the dead backend");
    // Every client, including those whose flow was on the dead backend, is
    // now answered by the live one.
    for c in &clients {
        assert_eq!(ask(c, lb.listen, "after").as_deref(), Some("good"));
    }
}

fn large_datagrams_pass_intact(engine: &str) {
    let b = UdpBackend::start("a");
    let lb = start(engine, 2, &[(b.addr, 1)], "", "");
    let c = client();
    for size in [1001usize, 9000, 32_768, 65_507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        c.send_to(&payload, lb.listen).unwrap();
        let mut buf = vec![0u8; 70_000];
        let n = c.recv(&mut buf).unwrap_or_else(|e| panic!("{size}: {e}"));
        assert_eq!(n, size);
        assert!(buf[..n] == payload[..], "{size}-byte datagram altered");
    }
}

fn malformed_and_empty_datagrams_disturb_nothing(engine: &str) {
    let b = UdpBackend::start("a");
    let lb = start(engine, 2, &[(b.addr, 1)], "", "");
    let good = client();
    assert!(ask(&good, lb.listen, "before").is_some());
    let noisy = client();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 7) * 13).map(|j| (j * 31 + i) as u8).collect();
        noisy.send_to(&junk, lb.listen).unwrap();
        noisy.send_to(&[], lb.listen).unwrap();
    }
    // Let the single-threaded test backend work through the 400 datagrams.
    thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        if ask(&good, lb.listen, &format!("after {i}")).is_none() {
            panic!(
                "no reply to \"after {i}\": {}",
                ctl_json(&lb.sock, &["stats"]).1["listeners"][0]
            );
        }
    }
    assert_eq!(ctl_json(&lb.sock, &["status"]).0, 0, "still running");
}

fn per_source_packet_rate_drops_only_the_noisy_source(engine: &str) {
    let b = UdpBackend::start("a");
    let lb = start(
        engine,
        2,
        &[(b.addr, 1)],
        "[listener.rate_limit]\nper_source_rate = 100\nper_source_packet_rate = 5\nper_source_packet_burst = 5\n",
        "",
    );
    let noisy = client();
    noisy.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    for i in 0..50 {
        noisy.send_to(format!("n{i}").as_bytes(), lb.listen).unwrap();
    }
    let mut replies = 0;
    let mut buf = [0u8; 64];
    while noisy.recv(&mut buf).is_ok() {
        replies += 1;
    }
    assert!(
        (5..=7).contains(&replies),
        "noisy source got {replies} replies for 50 datagrams at burst 5"
    );
    let quiet = UdpSocket::bind("127.0.0.2:0").unwrap();
    quiet.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..5 {
        assert!(
            ask(&quiet, lb.listen, &format!("q{i}")).is_some(),
            "quiet source served"
        );
    }
    let stats = ctl_json(&lb.sock, &["stats"]).1;
    let limited = stats["listeners"][0]["refused"]["rate_limited"].as_u64().unwrap();
    assert!(limited >= 40, "{stats}");
    // A datagram refused by the limiter is a datagram dropped, too.
    assert_eq!(
        stats["listeners"][0]["datagrams_dropped"].as_u64().unwrap(),
        limited,
        "{stats}"
    );
    assert_one_outcome_each(&stats);
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
    flows_spread_by_weight,
    flow_keeps_its_backend_for_1000_datagrams,
    replies_reach_the_right_flow_with_200_concurrent_flows,
    idle_flows_expire_and_close_their_sockets,
    full_flow_table_drops_new_flows_only,
    backend_going_down_moves_its_flows_on_the_next_datagram,
    icmp_unreachable_ejects_the_backend_and_its_flows_move,
    large_datagrams_pass_intact,
    malformed_and_empty_datagrams_disturb_nothing,
    per_source_packet_rate_drops_only_the_noisy_source,
);
