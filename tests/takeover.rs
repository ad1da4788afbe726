//! `ringlb run --takeover` through the real binary: repeated upgrades under
//! continuous load (new and long-lived connections, UDP flows), on both io
//! engines, counting failed connections, lost bytes and lost datagrams; and
//! failed upgrades that leave the running process serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A `ringlb run --takeover` we started; killed on drop if still running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signals our own child, not yet reaped.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status.code().unwrap_or(-1));
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

fn spawn_takeover(config: &Path, log: &Path) -> Proc {
    Proc(
        Command::new(ringlb_bin())
            .args(["run", "--takeover", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn ringlb --takeover"),
    )
}

fn status_pid(sock: &Path) -> Option<u64> {
    let (code, v) = ctl_json(sock, &["status"]);
    (code == 0).then(|| v["pid"].as_u64()).flatten()
}

/// Long-lived connections: each exchanges `rounds` numbered messages with
/// an echo backend (through its tag line), checking every byte, then
/// closes; repeated until stopped. Counts connections and bytes lost.
struct LongLived {
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl LongLived {
    fn start(target: SocketAddr, threads: usize, rounds: usize) -> LongLived {
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (stop, conns, failed, bytes) = (stop.clone(), conns.clone(), failed.clone(), bytes.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        conns.fetch_add(1, Ordering::SeqCst);
                        match exchange(target, t, rounds) {
                            Ok(n) => {
                                bytes.fetch_add(n, Ordering::SeqCst);
                            }
                            Err(e) => {
                                eprintln!("long-lived connection failed: {e}");
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                })
            })
            .collect();
        LongLived {
            stop,
            conns,
            failed,
            bytes,
            threads,
        }
    }

    /// (connections, failed, bytes echoed intact).
    fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.conns.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

fn exchange(target: SocketAddr, t: usize, rounds: usize) -> Result<usize, String> {
    let mut s = TcpStream::connect(target).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The tag line first.
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).map_err(|e| format!("tag: {e}"))?;
        if b[0] == b'\n' {
            break;
        }
    }
    let mut total = 0;
    for i in 0..rounds {
        let msg = format!("thread {t} message {i} {}\n", "x".repeat(200));
        s.write_all(msg.as_bytes()).map_err(|e| format!("write {i}: {e}"))?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).map_err(|e| format!("read {i}: {e}"))?;
        if back != msg.as_bytes() {
            return Err(format!("message {i} came back changed"));
        }
        total += msg.len();
        thread::sleep(Duration::from_millis(10));
    }
    Ok(total)
}

/// Short connections (connect, read the tag, close) until stopped; prints
/// the first failures with their error.
struct ShortLoad {
    stop: Arc<AtomicBool>,
    tried: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

impl ShortLoad {
    fn start(target: SocketAddr, threads: usize) -> ShortLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tried = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, tried, failed) = (stop.clone(), tried.clone(), failed.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        tried.fetch_add(1, Ordering::SeqCst);
                        if let Err(e) = read_tag(target, None) {
                            if failed.fetch_add(1, Ordering::SeqCst) < 5 {
                                eprintln!("short connection failed: {e}");
                            }
                        }
                    }
                })
            })
            .collect();
        ShortLoad {
            stop,
            tried,
            failed,
            threads,
            started: Instant::now(),
        }
    }

    fn finish(self) -> (usize, usize, f64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.tried.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.started.elapsed().as_secs_f64(),
        )
    }
}

/// A UDP echo backend; replies `payload` as it came.
fn udp_echo() -> (SocketAddr, Arc<AtomicBool>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::SeqCst) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    (addr, stop)
}

/// UDP flows: each thread keeps one client socket (one flow) and sends a
/// numbered datagram every 2 ms, counting the replies; (sent, answered).
struct UdpLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl UdpLoad {
    fn start(target: SocketAddr, flows: usize) -> UdpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let threads = (0..flows)
            .map(|_| {
                let (stop, sent, answered) = (stop.clone(), sent.clone(), answered.clone());
                thread::spawn(move || {
                    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                    c.connect(target).unwrap();
                    c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                    let mut seen = std::collections::HashSet::new();
                    let mut buf = [0u8; 64];
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let _ = c.send(&i.to_be_bytes());
                        sent.fetch_add(1, Ordering::SeqCst);
                        i += 1;
                        thread::sleep(Duration::from_millis(2));
                        while let Ok(n) = c.recv(&mut buf) {
                            if n == 8 && seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap())) {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    // Late replies.
                    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                    while let Ok(n) = c.recv(&mut buf) {
                        if n == 8 && seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap())) {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        UdpLoad {
            stop,
            sent,
            answered,
            threads,
        }
    }

    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        (self.sent.load(Ordering::SeqCst), self.answered.load(Ordering::SeqCst))
    }
}

fn config(
    engine: &str,
    dir: &Path,
    tcp: SocketAddr,
    udp: SocketAddr,
    backends: &[SocketAddr],
    udp_backend: SocketAddr,
) -> String {
    let mut c = format!(
        "[runtime]\nworkers = 2\nio_engine = \"{engine}\"\nshutdown_timeout = \"10s\"\n\n[control]\nsocket = \"{}\"\nstate_file = \"{}\"\n\n[[listener]]\nname = \"t\"\nbind = \"{tcp}\"\npool = \"p\"\n\n[[listener]]\nname = \"u\"\nbind = \"{udp}\"\nprotocol = \"udp\"\npool = \"up\"\nidle_timeout = \"2s\"\n\n[[pool]]\nname = \"p\"\n",
        dir.join("ctl.sock").display(),
        dir.join("state.json").display()
    );
    for b in backends {
        c.push_str(&format!("[[pool.backend]]\naddr = \"{b}\"\n"));
    }
    c.push_str(&format!(
        "\n[[pool]]\nname = \"up\"\n[[pool.backend]]\naddr = \"{udp_backend}\"\n"
    ));
    c
}

fn upgrades_under_load(engine: &str) {
    const UPGRADES: usize = 10;
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect();
    let (udp_backend, udp_stop) = udp_echo();
    let dir = TempDir::new("takeover");
    let sock = dir.0.join("ctl.sock");
    let tcp = lb_addr();
    let udp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config_path = dir.file("ringlb.toml", &config(engine, &dir.0, tcp, udp, &addrs, udp_backend));
    let first = Proc(
        Command::new(ringlb_bin())
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("first.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || is_listening(tcp)
        && status_pid(&sock).is_some()));
    // An operator state that must survive every upgrade.
    assert_eq!(ctl_json(&sock, &["drain", "p", &backends[2].addr.to_string()]).0, 0);

    let short = ShortLoad::start(tcp, 3);
    let long = LongLived::start(tcp, 3, 40);
    let udp_load = UdpLoad::start(udp, 4);
    thread::sleep(Duration::from_millis(300));

    let mut procs: Vec<Proc> = vec![first];
    let mut to_serving = Vec::new();
    for n in 0..UPGRADES {
        let old_pid = procs.last().unwrap().0.id() as u64;
        let log = dir.0.join(format!("upgrade-{n}.log"));
        let started = Instant::now();
        let mut new = spawn_takeover(&config_path, &log);
        let new_pid = new.0.id() as u64;
        let serving = wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("after --takeover")
        });
        if !serving {
            let _ = wait_exit(&mut new.0, Duration::from_millis(100));
            let old_log = if n == 0 {
                dir.0.join("first.log")
            } else {
                dir.0.join(format!("upgrade-{}.log", n - 1))
            };
            panic!(
                "upgrade {n}: not serving within 15s:\n{}\nold process:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(old_log).unwrap_or_default()
            );
        }
        to_serving.push(started.elapsed());
        assert_eq!(
            status_pid(&sock),
            Some(new_pid),
            "upgrade {n}: ctl reaches the new process"
        );
        let mut old = procs.pop().unwrap();
        let code = wait_exit(&mut old.0, Duration::from_secs(15));
        assert_eq!(
            code,
            Some(0),
            "upgrade {n}: process {old_pid} exits 0 after its connections"
        );
        procs.push(new);
        thread::sleep(Duration::from_millis(200));
    }

    thread::sleep(Duration::from_millis(300));
    let (tried, failed, secs) = short.finish();
    let (long_conns, long_failed, bytes) = long.finish();
    let (sent, answered) = udp_load.finish();
    udp_stop.store(true, Ordering::SeqCst);
    let mut ms: Vec<f64> = to_serving.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{engine}: {UPGRADES} upgrades in {secs:.1}s: short connections {tried} tried, {failed} failed; long-lived {long_conns} connections, {long_failed} failed, {bytes} bytes echoed intact; UDP {sent} datagrams sent, {} unanswered; --takeover to serving: median {:.0} ms, max {:.0} ms",
        sent - answered,
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    assert!(
        tried > 100 && long_conns > 10,
        "the load ran: {tried} short, {long_conns} long"
    );
    assert_eq!(failed, 0, "short connections failed across the upgrades");
    assert_eq!(
        long_failed, 0,
        "long-lived connections failed or lost bytes across the upgrades"
    );
    // The drain survived ten upgrades: nothing reached backend c after it.
    let c = backend_info(&sock, "p", backends[2].addr);
    assert_eq!(c["state"], "draining", "{c}");
    // The old process answers its flows until they go idle, the new one
    // opens new flows to the same backend (Maglev): no datagram lost.
    assert_eq!(sent - answered, 0, "UDP datagrams unanswered across the upgrades");
}

#[test]
fn ten_upgrades_under_load_fail_no_connection_uring() {
    upgrades_under_load("uring");
}

#[test]
fn ten_upgrades_under_load_fail_no_connection_epoll() {
    upgrades_under_load("epoll");
}

/// A failed upgrade, three ways: a config that fails validation, a new
/// process that dies during start (its new listener's address is taken),
/// and a handover protocol the running ringlb does not speak. Each leaves
/// the running process serving, with its control socket, as before.
#[test]
fn failed_upgrades_leave_the_old_process_serving() {
    let backend = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("takeover-fail");
    let sock = dir.0.join("ctl.sock");
    let tcp = lb_addr();
    let (udp_backend, udp_stop) = udp_echo();
    let udp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let good = config("epoll", &dir.0, tcp, udp, &[backend.addr], udp_backend);
    let config_path = dir.file("ringlb.toml", &good);
    let mut old = Proc(
        Command::new(ringlb_bin())
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let old_pid = old.0.id() as u64;
    assert!(wait_until(Duration::from_secs(10), || is_listening(tcp)
        && status_pid(&sock).is_some()));
    let serving = |why: &str| {
        assert_eq!(
            status_pid(&sock),
            Some(old_pid),
            "{why}: ctl still reaches the old process"
        );
        for _ in 0..20 {
            assert_eq!(read_tag(tcp, None).unwrap(), "a", "{why}");
        }
    };

    // 1. A config that fails validation: refused before the old one is asked.
    let bad = dir.file(
        "bad.toml",
        &good.replace("pool = \"p\"\n\n[[listener]]", "pool = \"nope\"\n\n[[listener]]"),
    );
    let out = Command::new(ringlb_bin())
        .args(["run", "--takeover", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not started"));
    serving("after a config that fails validation");

    // 2. The new process dies during start, after it has the sockets: a
    // listener it adds is on an address another process holds.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let dying = format!("{good}\n[[listener]]\nname = \"extra\"\nbind = \"{taken}\"\npool = \"p\"\n");
    let dying_path = dir.file("dying.toml", &dying);
    let log = dir.0.join("dying.log");
    let mut new = spawn_takeover(&dying_path, &log);
    assert_eq!(wait_exit(&mut new.0, Duration::from_secs(15)), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("already in use by another process"), "{text}");
    serving("after a new process that died during start");

    // 2b. It dies later, after binding its control socket: its metrics
    // address is taken. ctl still reaches the old process, and nothing of
    // the new one is left in the socket's directory.
    let late = good.replace("[control]\n", &format!("[control]\nmetrics = \"{taken}\"\n"));
    let late_path = dir.file("late.toml", &late);
    let log = dir.0.join("late.log");
    let mut new = spawn_takeover(&late_path, &log);
    assert_eq!(wait_exit(&mut new.0, Duration::from_secs(15)), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("control.metrics: cannot bind"), "{text}");
    serving("after a new process that died after binding its control socket");
    let leftovers: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ctl.sock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // 3. A version that cannot take the sockets (another handover protocol).
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"{\"cmd\":\"takeover\",\"protocol\":99,\"pid\":1}\n")
        .unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&c).read_line_into(&mut reply);
    assert!(
        reply.contains("\"ok\":false") && reply.contains("protocol 99"),
        "{reply}"
    );
    drop(c);
    serving("after a handover protocol it does not speak");

    // And a real upgrade still works afterwards.
    let log = dir.0.join("good.log");
    let new = spawn_takeover(&config_path, &log);
    let new_pid = new.0.id() as u64;
    assert!(wait_until(Duration::from_secs(15), || status_pid(&sock) == Some(new_pid)));
    assert_eq!(wait_exit(&mut old.0, Duration::from_secs(15)), Some(0));
    assert_eq!(read_tag(tcp, None).unwrap(), "a");
    udp_stop.store(true, Ordering::SeqCst);
    drop(new);
}

trait ReadLineInto {
    fn read_line_into(&mut self, into: &mut String);
}

impl<R: std::io::BufRead> ReadLineInto for R {
    fn read_line_into(&mut self, into: &mut String) {
        let _ = self.read_line(into);
    }
}

/// `ctl status` on the new process shows the old one draining (its pid and
/// open connections) until it has exited.
#[test]
fn status_shows_the_previous_process_while_it_drains() {
    let backend = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("takeover-status");
    let sock = dir.0.join("ctl.sock");
    let tcp = lb_addr();
    let (udp_backend, udp_stop) = udp_echo();
    let udp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config_path = dir.file(
        "ringlb.toml",
        &config("uring", &dir.0, tcp, udp, &[backend.addr], udp_backend),
    );
    let mut old = Proc(
        Command::new(ringlb_bin())
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let old_pid = old.0.id() as u64;
    assert!(wait_until(Duration::from_secs(10), || is_listening(tcp)
        && status_pid(&sock).is_some()));
    // A connection held open across the upgrade.
    let mut held = TcpStream::connect(tcp).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tag = [0u8; 2];
    held.read_exact(&mut tag).unwrap();
    let log = dir.0.join("new.log");
    let _new = spawn_takeover(&config_path, &log);
    let mut shown = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (_, v) = ctl_json(&sock, &["status"]);
            shown = v["predecessor"].clone();
            shown["pid"].as_u64() == Some(old_pid)
        }),
        "status: {shown}\nnew process log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(shown["open_connections"], 1, "{shown}");
    let (_, text, _) = ctl_text(&sock, &["status"]);
    assert!(
        text.contains(&format!("previous process {old_pid} (ringlb "))
            && text.contains("draining, 1 open connection(s)"),
        "{text}"
    );
    // The held connection still works through the old process.
    held.write_all(b"ping\n").unwrap();
    let mut back = [0u8; 5];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping\n");
    drop(held);
    assert_eq!(wait_exit(&mut old.0, Duration::from_secs(15)), Some(0));
    assert!(wait_until(Duration::from_secs(10), || {
        ctl_json(&sock, &["status"]).1["predecessor"].is_null()
    }));
    udp_stop.store(true, Ordering::SeqCst);
}

/// An upgrade may change `runtime.workers`: with more workers the new
/// process adds sockets to the SO_REUSEPORT group, with fewer it serves
/// every handed-over socket anyway (one dropped would reset the clients in
/// its queue). Under load, no connection fails either way.
#[test]
fn an_upgrade_may_change_the_worker_count() {
    let backend = Backend::start("a", Behaviour::TagEcho);
    let (udp_backend, udp_stop) = udp_echo();
    let dir = TempDir::new("takeover-workers");
    let sock = dir.0.join("ctl.sock");
    let tcp = lb_addr();
    let udp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let base = config("epoll", &dir.0, tcp, udp, &[backend.addr], udp_backend);
    let config_path = dir.file("ringlb.toml", &base);
    let mut current = Proc(
        Command::new(ringlb_bin())
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || is_listening(tcp)
        && status_pid(&sock).is_some()));
    let short = ShortLoad::start(tcp, 3);
    let udp_load = UdpLoad::start(udp, 2);
    for (n, workers) in [3, 1, 2].into_iter().enumerate() {
        std::fs::write(
            &config_path,
            base.replace("workers = 2", &format!("workers = {workers}")),
        )
        .unwrap();
        let log = dir.0.join(format!("w{n}.log"));
        let new = spawn_takeover(&config_path, &log);
        let new_pid = new.0.id() as u64;
        assert!(
            wait_until(Duration::from_secs(15), || status_pid(&sock) == Some(new_pid)),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let (_, v) = ctl_json(&sock, &["status"]);
        assert_eq!(v["workers"].as_array().unwrap().len(), workers, "{v}");
        assert_eq!(wait_exit(&mut current.0, Duration::from_secs(15)), Some(0));
        current = new;
        thread::sleep(Duration::from_millis(300));
    }
    let (tried, failed, _) = short.finish();
    let (sent, answered) = udp_load.finish();
    udp_stop.store(true, Ordering::SeqCst);
    println!(
        "workers 2 -> 3 -> 1 -> 2: {tried} connections, {failed} failed; UDP {sent} sent, {} unanswered",
        sent - answered
    );
    assert!(tried > 100);
    assert_eq!(failed, 0);
    assert_eq!(sent - answered, 0);
}
