//! Chaos run: ringlb under mixed TCP and UDP load while a seeded chaos
//! thread kills, stalls, resets and restarts backends, reloads (valid and
//! broken configs), churns `ctl` and puts descriptor pressure on it.
//!
//! Checked: no `no_backend` refusal while the chaos thread's own model says a
//! usable backend exists (every 250 ms stats sample), every client error is
//! explained by a backend disturbed in its window or by a refusal counted
//! under a reason, `ctl` commands are accepted or refused as the pool rules
//! say, and at the end `accepted = relayed + Σ refused` per listener and
//! ringlb's RSS and descriptors are flat.
//!
//! `CHAOS_SECS` (io_uring pass; default 60, the epoll pass runs a quarter
//! of it, at least 5 s) and `CHAOS_SEED` (default 1) override. See
//! `tests/README.md`, section "Chaos run".

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// ringlb's descriptor limit (hard and soft): the idle bursts go past it.
const FD_LIMIT: u64 = 1024;
/// Idle client connections per descriptor-pressure burst (two descriptors
/// each in ringlb: past `FD_LIMIT`).
const BURST: usize = 600;
const TCP_BACKENDS: usize = 5;
const UDP_BACKENDS: usize = 3;
/// Pool `drain_timeout`.
const DRAIN: Duration = Duration::from_secs(2);
/// Client read/connect timeout: far above any stall the chaos thread makes.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_TIMEOUT: Duration = Duration::from_millis(1500);
/// Attribution margins around a failure's window.
const BEFORE: Duration = Duration::from_millis(1500);
const AFTER: Duration = Duration::from_millis(1500);

/// Runs one chaos pass at a time (the two tests would share the 2 cores).
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn chaos_io_uring() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs = env_u64("CHAOS_SECS", 60);
    run("uring", secs, env_u64("CHAOS_SEED", 1));
}

#[test]
fn chaos_epoll() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs = (env_u64("CHAOS_SECS", 60) / 4).max(5);
    run("epoll", secs, env_u64("CHAOS_SEED", 1).wrapping_add(1_000_003));
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// === a small seeded PRNG (splitmix64) ===

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// === backends the chaos thread controls ===

/// A TCP backend drained, disabled or removed (ctl or reload): its open
/// connections are closed after the drain timeout.
const OUT_OF_SERVICE: &str = "out of service (drained/disabled/removed)";

const ECHO: u8 = 0;
const STALL: u8 = 1;
const RESET: u8 = 2;

/// A running incarnation of a TCP backend.
struct TcpInst {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accept: thread::JoinHandle<()>,
}

/// A TCP backend on a fixed port: echo (after a tag line `bN`), stall
/// (no byte either way, open connections included), reset (every open and
/// new connection), killed (listener and every connection closed).
struct TcpBackend {
    id: usize,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    inst: Option<TcpInst>,
}

impl TcpBackend {
    fn start(id: usize) -> TcpBackend {
        let mut b = TcpBackend {
            id,
            addr: "127.0.0.1:0".parse().unwrap(),
            mode: Arc::new(AtomicU8::new(ECHO)),
            inst: None,
        };
        b.revive();
        b
    }

    fn alive(&self) -> bool {
        self.inst.is_some()
    }

    /// Starts listening again on its port (the first time: any port).
    fn revive(&mut self) {
        assert!(self.inst.is_none());
        self.mode.store(ECHO, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            match s.bind(&self.addr.into()).and_then(|_| s.listen(4096)) {
                Ok(()) => break TcpListener::from(s),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("backend b{} cannot listen on {} again: {e}", self.id, self.addr),
            }
        };
        self.addr = listener.local_addr().unwrap();
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let (l, st, cs, mode, id) = (
            listener.clone(),
            stop.clone(),
            conns.clone(),
            self.mode.clone(),
            self.id,
        );
        let accept = thread::spawn(move || {
            let mut n = 0u64;
            for s in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                n += 1;
                if let Ok(c) = s.try_clone() {
                    cs.lock().unwrap().insert(n, c);
                }
                let (st2, cs2, mode2) = (st.clone(), cs.clone(), mode.clone());
                let spawned = thread::Builder::new().stack_size(128 * 1024).spawn(move || {
                    serve_tcp(s, id, &mode2, &st2);
                    cs2.lock().unwrap().remove(&n);
                });
                if spawned.is_err() {
                    cs.lock().unwrap().remove(&n);
                }
            }
        });
        self.inst = Some(TcpInst {
            stop,
            listener,
            conns,
            accept,
        });
    }

    /// Dies like a process: the listener and every connection close.
    fn kill(&mut self) {
        let Some(inst) = self.inst.take() else { return };
        inst.stop.store(true, Ordering::SeqCst);
        // SAFETY: the listener is open (this Arc holds it); shutdown wakes
        // the blocking accept.
        unsafe {
            libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&*inst.listener), libc::SHUT_RDWR);
        }
        let _ = inst.accept.join();
        drop(inst.listener);
        for (_, c) in inst.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn serve_tcp(mut s: TcpStream, id: usize, mode: &AtomicU8, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = s.set_nodelay(true);
    let mut tagged = false;
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match mode.load(Ordering::SeqCst) {
            RESET => {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                return;
            }
            STALL => thread::sleep(Duration::from_millis(50)),
            _ => {
                if !tagged {
                    if s.write_all(format!("b{id}\n").as_bytes()).is_err() {
                        return;
                    }
                    tagged = true;
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// A UDP backend on a fixed port: replies `PAYLOAD|uN`; stalled it reads
/// and drops; killed its socket is closed (ICMP port unreachable).
struct UdpBackend {
    id: usize,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    inst: Option<(Arc<AtomicBool>, thread::JoinHandle<()>)>,
}

impl UdpBackend {
    fn start(id: usize) -> UdpBackend {
        let mut b = UdpBackend {
            id,
            addr: "127.0.0.1:0".parse().unwrap(),
            mode: Arc::new(AtomicU8::new(ECHO)),
            inst: None,
        };
        b.revive();
        b
    }

    fn alive(&self) -> bool {
        self.inst.is_some()
    }

    fn revive(&mut self) {
        self.mode.store(ECHO, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        let socket = loop {
            match UdpSocket::bind(self.addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("udp backend u{} cannot bind {} again: {e}", self.id, self.addr),
            }
        };
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        self.addr = socket.local_addr().unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, mode, id) = (stop.clone(), self.mode.clone(), self.id);
        let t = thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if mode.load(Ordering::SeqCst) == ECHO {
                    let mut reply = buf[..n].to_vec();
                    reply.extend_from_slice(format!("|u{id}").as_bytes());
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        self.inst = Some((stop, t));
    }

    fn kill(&mut self) {
        if let Some((stop, t)) = self.inst.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = t.join();
        }
    }
}

// === what happened, with times ===

#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

/// A backend not serving normally over `[start, end]`.
#[derive(Clone, Debug)]
struct Disturbance {
    proto: Proto,
    backend: usize,
    kind: &'static str,
    start: Instant,
    end: Option<Instant>,
}

/// A client-visible failure.
#[derive(Clone, Debug)]
struct Failure {
    proto: Proto,
    client: &'static str,
    /// Last moment the connection or flow was known good (or the attempt began).
    since: Instant,
    at: Instant,
    backend: Option<usize>,
    what: String,
}

/// One `ctl stats` sample.
#[derive(Clone)]
struct Sample {
    sent: Instant,
    got: Instant,
    /// Per listener name: (refused by reason, datagrams_dropped).
    listeners: HashMap<String, (BTreeMap<String, u64>, u64)>,
}

#[derive(Default)]
struct Journal {
    disturbances: Vec<Disturbance>,
    failures: Vec<Failure>,
    /// Windows in which pool "web" had no usable backend by the model.
    unusable: Vec<(Instant, Option<Instant>)>,
    /// Descriptor-pressure bursts.
    pressure: Vec<(Instant, Instant)>,
    samples: Vec<Sample>,
    /// Things that are wrong whatever the explanation.
    violations: Vec<String>,
    /// The chaos thread's ctl commands and reloads, for the report of an
    /// unexplained failure.
    trace: Vec<(Instant, String)>,
}

struct Shared {
    journal: Mutex<Journal>,
    stop_load: AtomicBool,
    stop_monitor: AtomicBool,
    t0: Instant,
    counts: Mutex<BTreeMap<&'static str, (u64, u64)>>,
    udp_sent: AtomicU64,
    udp_replied: AtomicU64,
    tcp_exchanges: AtomicU64,
}

impl Shared {
    fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64()
    }
    fn tried(&self, client: &'static str, ok: bool) {
        let mut c = self.counts.lock().unwrap();
        let e = c.entry(client).or_default();
        e.0 += 1;
        if !ok {
            e.1 += 1;
        }
    }
    fn fail(&self, f: Failure) {
        self.journal.lock().unwrap().failures.push(f);
    }
    fn disturb(&self, proto: Proto, backend: usize, kind: &'static str) {
        self.journal.lock().unwrap().disturbances.push(Disturbance {
            proto,
            backend,
            kind,
            start: Instant::now(),
            end: None,
        });
    }
    /// Ends the open disturbances of a backend (of `kind`, or all).
    fn undisturb(&self, proto: Proto, backend: usize, kind: Option<&'static str>) {
        let now = Instant::now();
        for d in &mut self.journal.lock().unwrap().disturbances {
            if d.proto == proto && d.backend == backend && d.end.is_none() && kind.is_none_or(|k| k == d.kind) {
                d.end = Some(now);
            }
        }
    }
    fn trace(&self, what: String) {
        self.journal.lock().unwrap().trace.push((Instant::now(), what));
    }
    fn violation(&self, v: String) {
        self.journal.lock().unwrap().violations.push(v);
    }
}

// === the run ===

struct Addrs {
    engine: String,
    sock: PathBuf,
    tcp: SocketAddr,
    udp: SocketAddr,
    tcp_backends: Vec<SocketAddr>,
    udp_backends: Vec<SocketAddr>,
}

impl Addrs {
    /// The config file with pool "web" holding `web` (index, weight) and
    /// pool "game" every UDP backend at `game` weights.
    fn config(&self, web: &[(usize, u32)], game: &[u32]) -> String {
        let mut body = format!(
            "[[listener]]\nname = \"tcp\"\nbind = \"{}\"\npool = \"web\"\nconnect_timeout = \"1s\"\nidle_timeout = \"30s\"\nconnect_attempts = 3\n\n\
             [[listener]]\nname = \"udp\"\nbind = \"{}\"\nprotocol = \"udp\"\npool = \"game\"\nidle_timeout = \"4s\"\n\n\
             [[pool]]\nname = \"web\"\ntable_size = 65537\ndrain_timeout = \"{}s\"\n\
             [pool.health_check]\nkind = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n\
             [pool.outlier]\nconsecutive_failures = 3\nejection_time = \"2s\"\nmax_ejection_time = \"8s\"\n",
            self.tcp,
            self.udp,
            DRAIN.as_secs()
        );
        for (i, w) in web {
            body.push_str(&format!(
                "[[pool.backend]]\naddr = \"{}\"\nweight = {w}\n",
                self.tcp_backends[*i]
            ));
        }
        body.push_str(
            "\n[[pool]]\nname = \"game\"\ntable_size = 65537\ndrain_timeout = \"2s\"\n\
             [pool.health_check]\nkind = \"udp_send_expect\"\nsend = \"hc\"\nexpect = \"hc|\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n\
             [pool.outlier]\nconsecutive_failures = 3\nejection_time = \"2s\"\nmax_ejection_time = \"8s\"\n",
        );
        for (a, w) in self.udp_backends.iter().zip(game) {
            body.push_str(&format!("[[pool.backend]]\naddr = \"{a}\"\nweight = {w}\n"));
        }
        config_with_control(&self.engine, &self.sock, &body)
    }
}

fn start_ringlb(cfg: &Path, listen: SocketAddr) -> Ringlb {
    let mut cmd = std::process::Command::new(ringlb_bin());
    cmd.args(["run", "-c", path_str(cfg)])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .stdin(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: FD_LIMIT,
                rlim_max: FD_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut lb = Ringlb {
        child: cmd.spawn().expect("spawn ringlb"),
        dir: TempDir::new("chaos-lb"),
        config: cfg.to_path_buf(),
        log: None,
    };
    lb.wait_listening(listen);
    lb
}

/// RSS (KiB) and open descriptors of `pid`.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// A persistent raw control-socket client (cheaper than `ringlb ctl` for
/// the 4 samples a second).
struct Ctl {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Ctl {
    fn connect(sock: &Path) -> std::io::Result<Ctl> {
        let w = UnixStream::connect(sock)?;
        w.set_read_timeout(Some(Duration::from_secs(5)))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Ctl { w, r })
    }
    fn ask(&mut self, req: &str) -> std::io::Result<serde_json::Value> {
        self.w.write_all(format!("{req}\n").as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

fn stats_once(sock: &Path) -> serde_json::Value {
    let (code, v) = ctl_json(sock, &["stats"]);
    assert_eq!(code, 0, "ctl stats: {v}");
    v
}

fn listener<'a>(stats: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    stats["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn run(engine: &str, secs: u64, seed: u64) {
    let t_start = Instant::now();
    let dir = TempDir::new("chaos");
    let addrs = Addrs {
        engine: engine.to_string(),
        sock: dir.0.join("ctl.sock"),
        tcp: lb_addr(),
        udp: SocketAddr::from(([127, 0, 0, 1], free_port())),
        tcp_backends: vec![],
        udp_backends: vec![],
    };
    let tcp_backends: Vec<TcpBackend> = (0..TCP_BACKENDS).map(TcpBackend::start).collect();
    let udp_backends: Vec<UdpBackend> = (0..UDP_BACKENDS).map(UdpBackend::start).collect();
    let addrs = Addrs {
        tcp_backends: tcp_backends.iter().map(|b| b.addr).collect(),
        udp_backends: udp_backends.iter().map(|b| b.addr).collect(),
        ..addrs
    };
    // Pool "web" starts with b0..b3 (b4 is a spare for add and reloads).
    let first_web: Vec<(usize, u32)> = (0..4).map(|i| (i, 1 + i as u32 % 2)).collect();
    let cfg_path = dir.file("ringlb.toml", &addrs.config(&first_web, &[1, 1, 1]));
    let mut lb = start_ringlb(&cfg_path, addrs.tcp);
    let pid = lb.pid();
    assert!(
        wait_until(Duration::from_secs(10), || ctl_json(&addrs.sock, &["status"]).0 == 0),
        "control socket up"
    );
    println!(
        "chaos [{engine}]: seed {seed}, {secs} s, ringlb pid {pid} (descriptor limit {FD_LIMIT}), tcp {} udp {}",
        addrs.tcp, addrs.udp
    );

    let shared = Arc::new(Shared {
        journal: Mutex::new(Journal::default()),
        stop_load: AtomicBool::new(false),
        stop_monitor: AtomicBool::new(false),
        t0: Instant::now(),
        counts: Mutex::new(BTreeMap::new()),
        udp_sent: AtomicU64::new(0),
        udp_replied: AtomicU64::new(0),
        tcp_exchanges: AtomicU64::new(0),
    });

    // Monitor: stats every 250 ms.
    let monitor = {
        let (sh, sock) = (shared.clone(), addrs.sock.clone());
        thread::spawn(move || monitor(&sh, &sock))
    };
    // Load.
    let mut load = Vec::new();
    for (i, kind) in [
        "keepalive",
        "keepalive",
        "per_request",
        "per_request",
        "long_lived",
        "long_lived",
        "long_lived",
    ]
    .into_iter()
    .enumerate()
    {
        let (sh, lbaddr) = (shared.clone(), addrs.tcp);
        let rng = Rng(seed.wrapping_mul(31).wrapping_add(i as u64 + 1));
        load.push(thread::spawn(move || tcp_client(&sh, lbaddr, kind, rng)));
    }
    for i in 0..3 {
        let (sh, lbaddr) = (shared.clone(), addrs.udp);
        let rng = Rng(seed.wrapping_mul(37).wrapping_add(i + 100));
        load.push(thread::spawn(move || udp_client(&sh, lbaddr, rng)));
    }

    // Warm-up: load, one descriptor-pressure burst (slab and buffers reach
    // their size), then the baseline footprint.
    thread::sleep(Duration::from_secs(2));
    let mut chaos = Chaos {
        sh: shared.clone(),
        addrs,
        tcp: tcp_backends,
        udp: udp_backends,
        rng: Rng(seed),
        model: first_web
            .iter()
            .map(|&(i, w)| {
                (
                    i,
                    Member {
                        weight: w,
                        admin: Admin::Enabled,
                        removing: false,
                    },
                )
            })
            .collect(),
        file_web: first_web.clone(),
        file_game: vec![1, 1, 1],
        usable_since_unusable: None,
        pending: Vec::new(),
        lb_pid: pid,
        cfg_path: cfg_path.clone(),
        stats: ChaosStats::default(),
        generation: 1,
    };
    chaos.pressure();
    thread::sleep(Duration::from_secs(2));
    let baseline = footprint(pid);
    let chaos_start = Instant::now();
    let chaos_end = chaos_start + Duration::from_secs(secs);
    while Instant::now() < chaos_end {
        chaos.step();
        thread::sleep(chaos.rng.range_ms(100, 600));
    }
    chaos.settle();
    let chaos_secs = chaos_start.elapsed().as_secs_f64();

    // Stop the load; everything ends.
    shared.stop_load.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let drained = wait_until(Duration::from_secs(30), || {
        let s = stats_once(&chaos.addrs.sock);
        listener(&s, "tcp")["active"] == 0 && listener(&s, "udp")["active"] == 0
    });
    shared.stop_monitor.store(true, Ordering::SeqCst);
    monitor.join().unwrap();
    let final_stats = stats_once(&chaos.addrs.sock);
    let end = footprint(pid);

    let mut problems = Vec::new();
    if !drained {
        problems.push(format!(
            "active did not return to 0 within 30 s after the load stopped: {final_stats}"
        ));
    }
    let mut totals = Vec::new();
    for name in ["tcp", "udp"] {
        let l = listener(&final_stats, name);
        let refused: BTreeMap<String, u64> = l["refused"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
            .unwrap_or_default();
        let sum: u64 = refused.values().sum();
        let (acc, rel) = (l["accepted"].as_u64().unwrap_or(0), l["relayed"].as_u64().unwrap_or(0));
        if acc != rel + sum {
            problems.push(format!(
                "listener {name}: accepted {acc} != relayed {rel} + refused {sum}: {l}"
            ));
        }
        let nonzero: Vec<String> = refused
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        totals.push(format!(
            "  listener {name}: accepted {acc} = relayed {rel} + refused {sum} ({}){}",
            if nonzero.is_empty() {
                "none".to_string()
            } else {
                nonzero.join(", ")
            },
            if name == "udp" {
                format!(
                    ", datagrams in {} out {} dropped {}",
                    l["datagrams_in"], l["datagrams_out"], l["datagrams_dropped"]
                )
            } else {
                String::new()
            }
        ));
    }
    // Flat footprint: the end (load gone) against the sample after warm-up
    // (load on, after one descriptor burst): descriptors within 24, RSS
    // within 25% + 8 MiB.
    let (rss_ok, fds_ok) = (
        end.0 <= baseline.0 + baseline.0 / 4 + 8 * 1024,
        end.1 <= baseline.1 + 24,
    );
    if !rss_ok || !fds_ok {
        problems.push(format!(
            "footprint not flat: RSS {} -> {} KiB (limit +25% + 8 MiB), descriptors {} -> {} (limit +24)",
            baseline.0, end.0, baseline.1, end.1
        ));
    }

    // Explanations.
    let journal = shared.journal.lock().unwrap();
    problems.extend(journal.violations.iter().cloned());
    problems.extend(check_no_backend(&shared, &journal));
    let refused_total_tcp: u64 = listener(&final_stats, "tcp")["refused"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    let mut by_cat: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexplained = Vec::new();
    let mut refusal_explained_tcp = 0u64;
    for f in &journal.failures {
        match explain(f, &journal) {
            Some(cat) => {
                if f.proto == Proto::Tcp && (cat.starts_with("refused") || cat.starts_with("descriptor pressure")) {
                    refusal_explained_tcp += 1;
                }
                // The client's error, without the OS's details.
                let seen = f.what.split(" (os error").next().unwrap_or("").to_string();
                *by_cat
                    .entry(format!("{:?} {}: {cat} [{seen}]", f.proto, f.client))
                    .or_default() += 1;
            }
            None => unexplained.push(f),
        }
    }
    if refusal_explained_tcp > refused_total_tcp {
        problems.push(format!(
            "{refusal_explained_tcp} TCP failures explained by refusals or descriptor pressure, but ringlb counted only {refused_total_tcp} refusals"
        ));
    }
    for f in unexplained.iter().take(20) {
        problems.push(format!(
            "unexplained {:?} {} failure at t={:.2}s (good since t={:.2}s, backend {}): {}",
            f.proto,
            f.client,
            shared.secs(f.at),
            shared.secs(f.since),
            f.backend.map_or("?".to_string(), |b| format!("{b}")),
            f.what
        ));
        // What the chaos thread did around it.
        let (from, to) = (f.since - Duration::from_secs(3), f.at + Duration::from_secs(3));
        for d in journal
            .disturbances
            .iter()
            .filter(|d| d.start <= to && d.end.is_none_or(|e| e >= from))
        {
            problems.push(format!(
                "    around it: {:?} backend {} {} t={:.2}s..{}",
                d.proto,
                d.backend,
                d.kind,
                shared.secs(d.start),
                d.end.map_or("open".to_string(), |e| format!("{:.2}s", shared.secs(e)))
            ));
        }
        for (t, what) in journal.trace.iter().filter(|(t, _)| *t >= from && *t <= to) {
            problems.push(format!("    around it: t={:.2}s {what}", shared.secs(*t)));
        }
        for (s, e) in journal.pressure.iter().filter(|(s, e)| *s <= to && *e >= from) {
            problems.push(format!(
                "    around it: descriptor pressure t={:.2}s..{:.2}s",
                shared.secs(*s),
                shared.secs(*e)
            ));
        }
    }
    if unexplained.len() > 20 {
        problems.push(format!("... {} unexplained failures in all", unexplained.len()));
    }

    // Summary.
    let counts = shared.counts.lock().unwrap();
    let st = &chaos.stats;
    println!(
        "chaos [{engine}] summary (seed {seed}, chaos {chaos_secs:.0} s, whole run {:.0} s):",
        t_start.elapsed().as_secs_f64()
    );
    for (client, (tried, failed)) in counts.iter() {
        println!("  {client}: {tried} tried, {failed} failed");
    }
    println!(
        "  tcp echo exchanges {}; udp datagrams sent {} replied {}",
        shared.tcp_exchanges.load(Ordering::Relaxed),
        shared.udp_sent.load(Ordering::Relaxed),
        shared.udp_replied.load(Ordering::Relaxed)
    );
    println!("  failures by explanation:");
    if by_cat.is_empty() {
        println!("    none");
    }
    for (cat, n) in &by_cat {
        println!("    {cat}: {n}");
    }
    println!("  unexplained: {}", unexplained.len());
    println!(
        "  chaos: tcp kills {} stalls {} resets {} restarts {}; udp kills {} stalls {} restarts {}; pressure bursts {} ({} idle connections each)",
        st.tcp_kill, st.tcp_stall, st.tcp_reset, st.tcp_restart, st.udp_kill, st.udp_stall, st.udp_restart, st.pressure, BURST
    );
    println!(
        "  reloads: {} ok ({} by SIGHUP), {} broken ones rejected, {} rejected for leaving only drained/disabled backends; ctl commands {} ({} accepted, {} refused as the pool rules say; {} remove+add of a draining backend)",
        st.reload_ok,
        st.reload_sighup,
        st.reload_rejected,
        st.reload_rejected_states,
        st.ctl, st.ctl_ok, st.ctl_refused, st.readd
    );
    println!(
        "  windows with no usable backend in pool web (by the model): {}",
        journal.unusable.len()
    );
    println!("  stats samples {}", journal.samples.len());
    for t in &totals {
        println!("{t}");
    }
    println!(
        "  ringlb footprint: RSS {} -> {} KiB, descriptors {} -> {}",
        baseline.0, end.0, baseline.1, end.1
    );
    drop(journal);
    drop(counts);
    let _ = &mut lb;
    assert!(
        problems.is_empty(),
        "chaos [{engine}] seed {seed}: {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Samples `ctl stats` every 250 ms until stopped.
fn monitor(sh: &Shared, sock: &Path) {
    let mut ctl: Option<Ctl> = None;
    let mut errors = 0;
    while !sh.stop_monitor.load(Ordering::SeqCst) {
        let sent = Instant::now();
        let reply = match ctl.as_mut() {
            Some(c) => c.ask("{\"cmd\":\"stats\"}"),
            None => Ctl::connect(sock).and_then(|mut c| {
                let r = c.ask("{\"cmd\":\"stats\"}");
                ctl = Some(c);
                r
            }),
        };
        match reply {
            Ok(v) if v["ok"] == true => {
                errors = 0;
                let mut listeners = HashMap::new();
                for l in v["listeners"].as_array().into_iter().flatten() {
                    let refused = l["refused"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
                        .unwrap_or_default();
                    listeners.insert(
                        l["name"].as_str().unwrap_or("").to_string(),
                        (refused, l["datagrams_dropped"].as_u64().unwrap_or(0)),
                    );
                }
                sh.journal.lock().unwrap().samples.push(Sample {
                    sent,
                    got: Instant::now(),
                    listeners,
                });
            }
            other => {
                ctl = None;
                errors += 1;
                if errors == 40 {
                    sh.violation(format!(
                        "the control socket did not answer stats for 10 s (t={:.1}s): {other:?}",
                        sh.secs(sent)
                    ));
                }
            }
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Every increase of `no_backend` must fall in a window where the model
/// had no usable backend (pool web) — pool game always has one.
fn check_no_backend(sh: &Shared, j: &Journal) -> Vec<String> {
    let slack = Duration::from_millis(500);
    let mut out = Vec::new();
    for w in j.samples.windows(2) {
        for (name, (refused, _)) in &w[1].listeners {
            let before = w[0]
                .listeners
                .get(name)
                .and_then(|l| l.0.get("no_backend"))
                .copied()
                .unwrap_or(0);
            let after = refused.get("no_backend").copied().unwrap_or(0);
            if after <= before {
                continue;
            }
            let (from, to) = (w[0].sent - slack, w[1].got + slack);
            let allowed = name == "tcp" && j.unusable.iter().any(|(s, e)| *s <= to && e.is_none_or(|e| e >= from));
            if !allowed {
                out.push(format!(
                    "listener {name}: {} no_backend refusal(s) between t={:.2}s and t={:.2}s while a usable backend existed",
                    after - before,
                    sh.secs(w[0].sent),
                    sh.secs(w[1].got)
                ));
            }
        }
    }
    out
}

/// Why a failure happened, if anything in its window explains it.
fn explain(f: &Failure, j: &Journal) -> Option<String> {
    let (from, to) = (f.since - BEFORE, f.at + AFTER);
    let overlaps = |s: Instant, e: Option<Instant>| s <= to && e.is_none_or(|e| e + AFTER >= from);
    if f.what.starts_with("corrupt") {
        return None;
    }
    // A TCP client that waited 10 s for a byte: only a stalled backend
    // (its own, or any before the tag came) holds a connection that long;
    // a killed or reset one closes it, and ringlb refuses at once.
    if f.proto == Proto::Tcp && f.what.contains("timed out") {
        // Stalled time of each backend within the wait: the wait must be
        // covered (but for 2 s of scheduling slack) by one backend's stalls.
        let wait = f.at.saturating_duration_since(f.since);
        return (0..TCP_BACKENDS)
            .filter(|b| f.backend.is_none_or(|fb| fb == *b))
            .map(|b| {
                let covered: Duration = j
                    .disturbances
                    .iter()
                    .filter(|d| d.proto == Proto::Tcp && d.backend == b && d.kind == "stalled")
                    .map(|d| {
                        let s = d.start.max(f.since);
                        let e = d.end.unwrap_or(f.at).min(f.at) + Duration::from_millis(500);
                        e.saturating_duration_since(s).min(wait)
                    })
                    .sum();
                (b, covered)
            })
            .find(|(_, covered)| *covered + Duration::from_secs(2) >= wait)
            .map(|(b, covered)| {
                format!(
                    "its backend stalled (b{b} for {:.1}s of the wait)",
                    covered.as_secs_f64()
                )
            });
    }
    // The backend it was on, disturbed.
    if let Some(b) = f.backend {
        if let Some(d) = j
            .disturbances
            .iter()
            .find(|d| d.proto == f.proto && d.backend == b && overlaps(d.start, d.end))
        {
            return Some(format!("its backend {}", d.kind));
        }
        if f.proto == Proto::Tcp {
            // Mid-connection on a known backend: nothing else closes it.
            return None;
        }
    }
    // Before the backend was known (TCP: reset or closed by a backend
    // before its tag), or a UDP flow (re-picked when its backend goes down):
    // any backend of that protocol disturbed in the window.
    if let Some(d) = j.disturbances.iter().find(|d| {
        // A stalled TCP backend delays a client (its timeout is longer
        // than any stall); it does not reset or close it.
        let can =
            d.kind != OUT_OF_SERVICE && (f.proto == Proto::Udp || d.kind != "stalled" || f.what.contains("timed out"));
        d.proto == f.proto && overlaps(d.start, d.end) && can
    }) {
        return Some(format!("a backend {} in its window", d.kind));
    }
    if j.pressure.iter().any(|(s, e)| overlaps(*s, Some(*e))) {
        return Some("descriptor pressure (overloaded)".into());
    }
    // Counted by ringlb under a reason in its window.
    let name = if f.proto == Proto::Tcp { "tcp" } else { "udp" };
    for w in j.samples.windows(2) {
        if !(w[0].sent <= to && w[1].got >= from) {
            continue;
        }
        let (Some(a), Some(b)) = (w[0].listeners.get(name), w[1].listeners.get(name)) else {
            continue;
        };
        for (reason, n) in &b.0 {
            if *n > a.0.get(reason).copied().unwrap_or(0) {
                return Some(format!("refused: {reason}"));
            }
        }
        if f.proto == Proto::Udp && b.1 > a.1 {
            return Some("refused: datagram dropped".into());
        }
    }
    if j.unusable.iter().any(|(s, e)| overlaps(*s, *e)) {
        return Some("no usable backend window".into());
    }
    None
}

// === clients ===

/// Opens a connection through ringlb and reads the backend's tag.
fn open(lb: SocketAddr) -> Result<(TcpStream, usize), String> {
    let mut s = TcpStream::connect_timeout(&lb, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut line = [0u8; 3];
    s.read_exact(&mut line).map_err(|e| format!("tag: {}", io_error(&e)))?;
    match line {
        [b'b', d, b'\n'] if d.is_ascii_digit() => Ok((s, (d - b'0') as usize)),
        _ => Err(format!("corrupt tag {:?}", String::from_utf8_lossy(&line))),
    }
}

/// An I/O error as the client saw it; a socket timeout says so.
fn io_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("timed out after {IO_TIMEOUT:?}"),
        _ => e.to_string(),
    }
}

fn exchange(s: &mut TcpStream, rng: &mut Rng) -> Result<(), String> {
    let len = 1 + rng.below(2000) as usize;
    let msg: Vec<u8> = (0..len).map(|i| b'a' + ((i as u64 + rng.0) % 26) as u8).collect();
    s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).map_err(|e| format!("read: {}", io_error(&e)))?;
    if back != msg {
        return Err("corrupt echo".into());
    }
    Ok(())
}

fn tcp_client(sh: &Shared, lb: SocketAddr, client: &'static str, mut rng: Rng) {
    while !sh.stop_load.load(Ordering::SeqCst) {
        let since = Instant::now();
        let (mut s, b) = match open(lb) {
            Ok(x) => x,
            Err(what) => {
                sh.tried(client, false);
                sh.fail(Failure {
                    proto: Proto::Tcp,
                    client,
                    since,
                    at: Instant::now(),
                    backend: None,
                    what,
                });
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let rounds = match client {
            "per_request" => 1,
            "keepalive" => 10 + rng.below(60),
            _ => u64::MAX,
        };
        let mut good = Instant::now();
        let mut ok = true;
        for _ in 0..rounds {
            if sh.stop_load.load(Ordering::SeqCst) {
                break;
            }
            match exchange(&mut s, &mut rng) {
                Ok(()) => {
                    sh.tcp_exchanges.fetch_add(1, Ordering::Relaxed);
                    good = Instant::now();
                }
                Err(what) => {
                    ok = false;
                    sh.fail(Failure {
                        proto: Proto::Tcp,
                        client,
                        since: good,
                        at: Instant::now(),
                        backend: Some(b),
                        what,
                    });
                    break;
                }
            }
            match client {
                "keepalive" => thread::sleep(Duration::from_millis(3)),
                "long_lived" => thread::sleep(Duration::from_millis(300)),
                _ => {}
            }
        }
        sh.tried(client, ok);
    }
}

/// Four flows per thread, round robin: `T-F-SEQ` must come back as
/// `T-F-SEQ|uN`.
fn udp_client(sh: &Shared, lb: SocketAddr, mut rng: Rng) {
    let id = rng.below(1000);
    struct Flow {
        s: UdpSocket,
        seq: u64,
        good: Instant,
        backend: Option<usize>,
    }
    let mut flows: Vec<Flow> = (0..4)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            Flow {
                s,
                seq: 0,
                good: Instant::now(),
                backend: None,
            }
        })
        .collect();
    let mut buf = [0u8; 2048];
    while !sh.stop_load.load(Ordering::SeqCst) {
        for (fi, f) in flows.iter_mut().enumerate() {
            f.seq += 1;
            let msg = format!("{id}-{fi}-{}", f.seq);
            let sent = Instant::now();
            sh.udp_sent.fetch_add(1, Ordering::Relaxed);
            let _ = f.s.send_to(msg.as_bytes(), lb);
            let mut answer = None;
            while sent.elapsed() < UDP_TIMEOUT {
                let Ok((n, from)) = f.s.recv_from(&mut buf) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let Some((echo, tag)) = text.rsplit_once('|') else {
                    answer = Some(Err(format!("corrupt reply {text:?}")));
                    break;
                };
                if echo == msg && from == lb {
                    answer = Some(
                        tag.strip_prefix('u')
                            .and_then(|d| d.parse::<usize>().ok())
                            .ok_or_else(|| format!("corrupt tag {text:?}")),
                    );
                    break;
                }
                // A late reply to an earlier datagram of this flow: skip it.
                let late = echo
                    .rsplit_once('-')
                    .and_then(|(p, s)| Some(p == format!("{id}-{fi}") && s.parse::<u64>().ok()? < f.seq))
                    .unwrap_or(false);
                if !late {
                    answer = Some(Err(format!("corrupt: reply {text:?} to {msg:?}")));
                    break;
                }
            }
            sh.tried("udp_request", matches!(answer, Some(Ok(_))));
            match answer {
                Some(Ok(b)) => {
                    sh.udp_replied.fetch_add(1, Ordering::Relaxed);
                    f.good = Instant::now();
                    f.backend = Some(b);
                }
                other => sh.fail(Failure {
                    proto: Proto::Udp,
                    client: "udp_request",
                    since: f.good.min(sent),
                    at: Instant::now(),
                    backend: f.backend,
                    what: match other {
                        Some(Err(e)) => e,
                        _ => format!("no reply within {UDP_TIMEOUT:?}"),
                    },
                }),
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

// === the chaos thread ===

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Admin {
    Enabled,
    Draining,
    Disabled,
}

#[derive(Clone, Copy, Debug)]
struct Member {
    weight: u32,
    admin: Admin,
    /// Leaving the pool once drained (`ctl remove`, gone from the file).
    removing: bool,
}

#[derive(Default)]
struct ChaosStats {
    tcp_kill: u64,
    tcp_stall: u64,
    tcp_reset: u64,
    tcp_restart: u64,
    udp_kill: u64,
    udp_stall: u64,
    udp_restart: u64,
    pressure: u64,
    reload_ok: u64,
    reload_sighup: u64,
    reload_rejected: u64,
    reload_rejected_states: u64,
    ctl: u64,
    ctl_ok: u64,
    ctl_refused: u64,
    readd: u64,
}

enum Undo {
    TcpRevive(usize),
    TcpEcho(usize),
    UdpRevive(usize),
    UdpEcho(usize),
}

struct Chaos {
    sh: Arc<Shared>,
    addrs: Addrs,
    tcp: Vec<TcpBackend>,
    udp: Vec<UdpBackend>,
    rng: Rng,
    /// Pool "web" as ringlb should have it: backend index -> member.
    model: BTreeMap<usize, Member>,
    file_web: Vec<(usize, u32)>,
    file_game: Vec<u32>,
    usable_since_unusable: Option<Instant>,
    pending: Vec<(Instant, Undo)>,
    lb_pid: u32,
    cfg_path: PathBuf,
    stats: ChaosStats,
    generation: u64,
}

impl Chaos {
    fn usable(&self) -> bool {
        self.model
            .values()
            .any(|m| !m.removing && m.admin == Admin::Enabled && m.weight > 0)
    }

    /// Whether the pool rules accept the pool as a change would leave it.
    fn rules_ok(members: &BTreeMap<usize, Member>) -> bool {
        let live: Vec<&Member> = members.values().filter(|m| !m.removing).collect();
        !live.is_empty() && live.iter().any(|m| m.weight > 0 && m.admin == Admin::Enabled)
    }

    /// Records the model's new state: a change issued at `sent`.
    fn model_changed(&mut self, sent: Instant) {
        let usable = self.usable();
        let mut j = self.sh.journal.lock().unwrap();
        match (usable, self.usable_since_unusable) {
            (false, None) => {
                j.unusable.push((sent, None));
                self.usable_since_unusable = Some(sent);
            }
            (true, Some(_)) => {
                if let Some(w) = j.unusable.last_mut() {
                    w.1 = Some(Instant::now());
                }
                self.usable_since_unusable = None;
            }
            _ => {}
        }
        drop(j);
        // Backends out of service: their connections close after the drain timeout.
        for (&i, m) in &self.model {
            let out = m.removing || m.admin != Admin::Enabled;
            let open = self
                .sh
                .journal
                .lock()
                .unwrap()
                .disturbances
                .iter()
                .any(|d| d.proto == Proto::Tcp && d.backend == i && d.kind == OUT_OF_SERVICE && d.end.is_none());
            if out && !open {
                self.sh.disturb(Proto::Tcp, i, OUT_OF_SERVICE);
            } else if !out && open {
                self.sh.undisturb(Proto::Tcp, i, Some(OUT_OF_SERVICE));
            }
        }
        for i in 0..TCP_BACKENDS {
            if !self.model.contains_key(&i) {
                self.sh.undisturb(Proto::Tcp, i, Some(OUT_OF_SERVICE));
            }
        }
    }

    fn due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.pending = later;
        for (_, u) in due {
            self.undo(u);
        }
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::TcpRevive(i) => {
                self.tcp[i].revive();
                self.sh.undisturb(Proto::Tcp, i, Some("killed"));
            }
            Undo::TcpEcho(i) => {
                self.tcp[i].mode.store(ECHO, Ordering::SeqCst);
                self.sh.undisturb(Proto::Tcp, i, Some("stalled"));
                self.sh.undisturb(Proto::Tcp, i, Some("reset"));
            }
            Undo::UdpRevive(i) => {
                self.udp[i].revive();
                self.sh.undisturb(Proto::Udp, i, Some("killed"));
            }
            Undo::UdpEcho(i) => {
                self.udp[i].mode.store(ECHO, Ordering::SeqCst);
                self.sh.undisturb(Proto::Udp, i, Some("stalled"));
            }
        }
    }

    fn tcp_busy(&self, i: usize) -> bool {
        !self.tcp[i].alive() || self.tcp[i].mode.load(Ordering::SeqCst) != ECHO
    }

    fn udp_busy(&self, i: usize) -> bool {
        !self.udp[i].alive() || self.udp[i].mode.load(Ordering::SeqCst) != ECHO
    }

    /// A healthy TCP backend to disturb (at most two disturbed at once).
    fn pick_tcp(&mut self) -> Option<usize> {
        let busy = (0..TCP_BACKENDS).filter(|&i| self.tcp_busy(i)).count();
        let calm: Vec<usize> = (0..TCP_BACKENDS).filter(|&i| !self.tcp_busy(i)).collect();
        (busy < 2 && !calm.is_empty()).then(|| calm[self.rng.below(calm.len() as u64) as usize])
    }

    fn pick_udp(&mut self) -> Option<usize> {
        let calm: Vec<usize> = (0..UDP_BACKENDS).filter(|&i| !self.udp_busy(i)).collect();
        (calm.len() == UDP_BACKENDS).then(|| calm[self.rng.below(calm.len() as u64) as usize])
    }

    fn step(&mut self) {
        self.due();
        let roll = self.rng.below(100);
        match roll {
            0..=6 => {
                if let Some(i) = self.pick_tcp() {
                    self.stats.tcp_kill += 1;
                    self.sh.disturb(Proto::Tcp, i, "killed");
                    self.tcp[i].kill();
                    let t = Instant::now() + self.rng.range_ms(500, 4000);
                    self.pending.push((t, Undo::TcpRevive(i)));
                }
            }
            7..=15 => {
                if let Some(i) = self.pick_tcp() {
                    self.stats.tcp_stall += 1;
                    self.sh.disturb(Proto::Tcp, i, "stalled");
                    self.tcp[i].mode.store(STALL, Ordering::SeqCst);
                    let t = Instant::now() + self.rng.range_ms(500, 5000);
                    self.pending.push((t, Undo::TcpEcho(i)));
                }
            }
            16..=21 => {
                if let Some(i) = self.pick_tcp() {
                    self.stats.tcp_reset += 1;
                    self.sh.disturb(Proto::Tcp, i, "reset");
                    self.tcp[i].mode.store(RESET, Ordering::SeqCst);
                    let t = Instant::now() + self.rng.range_ms(200, 2000);
                    self.pending.push((t, Undo::TcpEcho(i)));
                }
            }
            22..=27 => {
                if let Some(i) = self.pick_tcp() {
                    self.stats.tcp_restart += 1;
                    self.sh.disturb(Proto::Tcp, i, "restarted");
                    self.tcp[i].kill();
                    self.tcp[i].revive();
                    self.sh.undisturb(Proto::Tcp, i, Some("restarted"));
                }
            }
            28..=32 => {
                if let Some(i) = self.pick_udp() {
                    self.stats.udp_kill += 1;
                    self.sh.disturb(Proto::Udp, i, "killed");
                    self.udp[i].kill();
                    let t = Instant::now() + self.rng.range_ms(500, 4000);
                    self.pending.push((t, Undo::UdpRevive(i)));
                }
            }
            33..=36 => {
                if let Some(i) = self.pick_udp() {
                    self.stats.udp_stall += 1;
                    self.sh.disturb(Proto::Udp, i, "stalled");
                    self.udp[i].mode.store(STALL, Ordering::SeqCst);
                    let t = Instant::now() + self.rng.range_ms(500, 3000);
                    self.pending.push((t, Undo::UdpEcho(i)));
                }
            }
            37..=39 => {
                if let Some(i) = self.pick_udp() {
                    self.stats.udp_restart += 1;
                    self.sh.disturb(Proto::Udp, i, "restarted");
                    self.udp[i].kill();
                    self.udp[i].revive();
                    self.sh.undisturb(Proto::Udp, i, Some("restarted"));
                }
            }
            40..=52 => self.good_reload(),
            53..=59 => self.bad_reload(),
            60..=95 => self.ctl_churn(),
            _ => {
                // At most one burst per 10 s of chaos.
                let last = self.sh.journal.lock().unwrap().pressure.last().map(|p| p.1);
                if last.is_none_or(|l| l.elapsed() > Duration::from_secs(10)) {
                    self.pressure();
                }
            }
        }
    }

    /// Everything back to normal, the undo list emptied.
    fn settle(&mut self) {
        for (_, u) in std::mem::take(&mut self.pending) {
            self.undo(u);
        }
    }

    fn status_generation(&self) -> Option<u64> {
        let (code, v) = ctl_json(&self.addrs.sock, &["status"]);
        (code == 0).then(|| v["config_generation"].as_u64()).flatten()
    }

    fn write_config(&self, text: &str) {
        // Written whole then renamed: a SIGHUP never reads half a file.
        let tmp = self.cfg_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.cfg_path).unwrap();
    }

    fn good_reload(&mut self) {
        // A non-empty random membership, at least one weight > 0 (the file rules).
        let mut web: Vec<(usize, u32)> = Vec::new();
        for i in 0..TCP_BACKENDS {
            if self.rng.chance(70) {
                web.push((i, self.rng.below(4) as u32));
            }
        }
        // Sometimes only the backends an operator drained or disabled: a file
        // ringlb must reject, as it would leave the pool taking nothing.
        let out: Vec<usize> = self
            .model
            .iter()
            .filter(|(_, m)| !m.removing && m.admin != Admin::Enabled)
            .map(|(&i, _)| i)
            .collect();
        if !out.is_empty() && self.rng.chance(25) {
            web = out.iter().map(|&i| (i, 1 + self.rng.below(3) as u32)).collect();
        }
        if web.is_empty() {
            web.push((self.rng.below(TCP_BACKENDS as u64) as usize, 1));
        }
        if web.iter().all(|(_, w)| *w == 0) {
            web[0].1 = 1 + self.rng.below(3) as u32;
        }
        let game: Vec<u32> = (0..UDP_BACKENDS).map(|_| 1 + self.rng.below(3) as u32).collect();
        // The file wins for membership and weights; operator states of the
        // backends that stay are kept; a removed one that comes back is active.
        let mut next = BTreeMap::new();
        for &(i, w) in &web {
            let m = match self.model.get(&i) {
                Some(m) if !m.removing => Member { weight: w, ..*m },
                _ => Member {
                    weight: w,
                    admin: Admin::Enabled,
                    removing: false,
                },
            };
            next.insert(i, m);
        }
        for (&i, m) in &self.model {
            next.entry(i).or_insert(Member {
                admin: Admin::Draining,
                removing: true,
                ..*m
            });
        }
        // A file whose kept backends are all drained or disabled must be
        // rejected (it used to be applied, leaving the pool taking nothing).
        let accept = Self::rules_ok(&next);
        self.write_config(&self.addrs.config(&web, &game));
        let sighup = accept && self.rng.chance(30);
        let sent = Instant::now();
        self.sh
            .trace(format!("reload {web:?} (sighup {sighup}, expected to apply: {accept})"));
        let ok = if sighup {
            // SAFETY: signals ringlb, our child.
            unsafe { libc::kill(self.lb_pid as i32, libc::SIGHUP) };
            let want = self.generation + 1;
            let ok = wait_until(Duration::from_secs(10), || self.status_generation() >= Some(want));
            if !ok {
                self.sh.violation(format!(
                    "t={:.1}s: SIGHUP reload not applied within 10 s",
                    self.sh.secs(sent)
                ));
            }
            ok
        } else {
            let (code, v) = ctl_json(&self.addrs.sock, &["reload"]);
            if (code == 0) != accept {
                self.sh.violation(format!(
                    "t={:.1}s: reload {} but the model expected {}: {v}; model before {:?}, file {web:?}",
                    self.sh.secs(sent),
                    if code == 0 { "applied" } else { "rejected" },
                    if accept {
                        "success"
                    } else {
                        "a rejection (only drained/disabled backends kept)"
                    },
                    self.model
                ));
            }
            if code != 0 && !accept {
                self.stats.reload_rejected_states += 1;
            }
            code == 0
        };
        if !ok {
            // Put the file back to what ringlb runs.
            self.write_config(&self.addrs.config(&self.file_web, &self.file_game));
            if let Some(g) = self.status_generation().filter(|g| *g != self.generation) {
                self.generation = g;
                self.resync();
            }
            return;
        }
        self.generation += 1;
        self.stats.reload_ok += 1;
        self.stats.reload_sighup += u64::from(sighup);
        self.model = next;
        self.file_web = web;
        self.file_game = game;
        // Removed members stay in the model as `removing`: ringlb drops
        // them once drained, and either way a re-add makes them active.
        self.model_changed(sent);
    }

    fn bad_reload(&mut self) {
        let good = self.addrs.config(&self.file_web, &self.file_game);
        let (kind, text) = match self.rng.below(4) {
            0 => (
                "invalid TOML",
                good.replace("[[pool]]", "[[pool]").replace("weight = ", "weight == "),
            ),
            1 => ("empty file", String::new()),
            2 => ("truncated file", good[..good.find("[[listener]]").unwrap()].to_string()),
            _ => (
                "table_size not prime",
                good.replace("table_size = 65537", "table_size = 65536"),
            ),
        };
        self.write_config(&text);
        let sent = Instant::now();
        let (code, v) = ctl_json(&self.addrs.sock, &["reload"]);
        let generation = self.status_generation();
        if code != 1 || v["ok"] != false {
            self.sh.violation(format!(
                "t={:.1}s: reload of a broken config ({kind}) was not rejected: exit {code}: {v}",
                self.sh.secs(sent)
            ));
        } else {
            self.stats.reload_rejected += 1;
        }
        if generation != Some(self.generation) {
            self.sh.violation(format!(
                "t={:.1}s: rejected reload ({kind}) changed config_generation: {:?} != {}",
                self.sh.secs(sent),
                generation,
                self.generation
            ));
            if let Some(g) = generation {
                self.generation = g;
            }
        }
        self.write_config(&good);
    }

    fn ctl(&mut self, args: &[&str], expect_ok: bool, what: &str) -> bool {
        self.stats.ctl += 1;
        let (code, v) = ctl_json(&self.addrs.sock, args);
        self.sh.trace(format!("ctl {args:?}: exit {code}"));
        if code == 0 {
            self.stats.ctl_ok += 1;
        } else {
            self.stats.ctl_refused += 1;
        }
        if (code == 0) != expect_ok {
            let (_, backends) = ctl_json(&self.addrs.sock, &["backends", "web"]);
            self.sh.violation(format!(
                "t={:.1}s: ctl {args:?} ({what}): exit {code}, the model expected {}: {v}; model {:?}; ringlb: {backends}",
                self.sh.secs(Instant::now()),
                if expect_ok { "success" } else { "a refusal" },
                self.model
            ));
            self.resync();
        }
        code == 0
    }

    /// After a disagreement: take ringlb's view so the run goes on.
    fn resync(&mut self) {
        let (code, v) = ctl_json(&self.addrs.sock, &["backends", "web"]);
        if code != 0 {
            return;
        }
        let mut next = BTreeMap::new();
        for b in v["pools"][0]["backends"].as_array().into_iter().flatten() {
            let Some(i) = self.addrs.tcp_backends.iter().position(|a| b["addr"] == a.to_string()) else {
                continue;
            };
            let admin = match b["state"].as_str() {
                Some("draining") => Admin::Draining,
                Some("disabled") => Admin::Disabled,
                _ => Admin::Enabled,
            };
            next.insert(
                i,
                Member {
                    weight: b["weight"].as_u64().unwrap_or(0) as u32,
                    admin,
                    removing: b["removing"] == true,
                },
            );
        }
        self.model = next;
        self.model_changed(Instant::now());
    }

    fn ctl_churn(&mut self) {
        let mut i = self.rng.below(TCP_BACKENDS as u64) as usize;
        // Often the last usable backend: drain, disable, weight 0 or
        // remove of it must be refused (enable and weight > 0 are fine).
        let usable: Vec<usize> = self
            .model
            .iter()
            .filter(|(_, m)| !m.removing && m.admin == Admin::Enabled && m.weight > 0)
            .map(|(&i, _)| i)
            .collect();
        if usable.len() == 1 && self.rng.chance(50) {
            i = usable[0];
        }
        let addr = self.addrs.tcp_backends[i].to_string();
        let present = self.model.get(&i).is_some_and(|m| !m.removing);
        let mut after = self.model.clone();
        let sent = Instant::now();
        let op = self.rng.below(7);
        if !present {
            // Not in the pool (or leaving it): add it, taking a draining entry back.
            let w = self.rng.below(4) as u32;
            after.insert(
                i,
                Member {
                    weight: w,
                    admin: Admin::Enabled,
                    removing: false,
                },
            );
            let ok = Self::rules_ok(&after);
            let ws = w.to_string();
            if self.ctl(&["add", "web", &addr, "--weight", &ws], ok, "add") {
                self.model = after;
            }
            self.model_changed(sent);
            return;
        }
        let m = self.model[&i];
        let (args, next): (Vec<String>, Option<Member>) = match op {
            0 => (
                vec!["drain".into()],
                Some(Member {
                    admin: Admin::Draining,
                    ..m
                }),
            ),
            1 => (
                vec!["disable".into()],
                Some(Member {
                    admin: Admin::Disabled,
                    ..m
                }),
            ),
            2 | 3 => (
                vec!["enable".into()],
                Some(Member {
                    admin: Admin::Enabled,
                    ..m
                }),
            ),
            4 => {
                let w = self.rng.below(4) as u32;
                (vec!["weight".into(), w.to_string()], Some(Member { weight: w, ..m }))
            }
            5 => (vec!["remove".into()], None),
            _ => {
                // remove + add of a draining backend (it used to take the pool down).
                self.readd(i, &addr, m);
                return;
            }
        };
        match next {
            Some(n) => {
                after.insert(i, n);
            }
            None => {
                after.insert(
                    i,
                    Member {
                        admin: Admin::Draining,
                        removing: true,
                        ..m
                    },
                );
            }
        }
        let ok = args[0] == "enable" || Self::rules_ok(&after);
        let mut full: Vec<&str> = vec![args[0].as_str(), "web", &addr];
        full.extend(args[1..].iter().map(String::as_str));
        if self.ctl(&full, ok, &args[0]) {
            self.model = after;
        }
        self.model_changed(sent);
    }

    fn readd(&mut self, i: usize, addr: &str, m: Member) {
        let sent = Instant::now();
        let mut after = self.model.clone();
        after.insert(
            i,
            Member {
                admin: Admin::Draining,
                removing: true,
                ..m
            },
        );
        if !self.ctl(&["remove", "web", addr], Self::rules_ok(&after), "remove before re-add") {
            self.model_changed(sent);
            return;
        }
        self.model = after;
        self.model_changed(sent);
        thread::sleep(self.rng.range_ms(0, 300));
        let w = m.weight.max(1);
        let mut back = self.model.clone();
        back.insert(
            i,
            Member {
                weight: w,
                admin: Admin::Enabled,
                removing: false,
            },
        );
        let sent = Instant::now();
        let ws = w.to_string();
        if self.ctl(
            &["add", "web", addr, "--weight", &ws],
            true,
            "re-add of a draining backend",
        ) {
            self.model = back;
            self.stats.readd += 1;
        }
        self.model_changed(sent);
        // The pool must serve at once (the bug: it took nothing new).
        if self.usable() {
            let t = Instant::now();
            let served = (0..5).any(|_| open(self.addrs.tcp).is_ok());
            if !served && !(0..TCP_BACKENDS).any(|b| self.tcp_busy(b)) {
                self.sh.violation(format!(
                    "t={:.1}s: after remove + add of draining b{i}, 5 new connections failed",
                    self.sh.secs(t)
                ));
            }
        }
    }

    /// A burst of idle client connections past ringlb's descriptor limit.
    fn pressure(&mut self) {
        self.stats.pressure += 1;
        let start = Instant::now();
        self.sh
            .journal
            .lock()
            .unwrap()
            .pressure
            .push((start, start + Duration::from_secs(3600)));
        let mut held = Vec::with_capacity(BURST);
        for _ in 0..BURST {
            if let Ok(s) = TcpStream::connect_timeout(&self.addrs.tcp, Duration::from_secs(2)) {
                held.push(s);
            }
        }
        thread::sleep(Duration::from_millis(1000));
        drop(held);
        // Descriptors come back as ringlb closes both sides.
        thread::sleep(Duration::from_millis(1500));
        if let Some(p) = self.sh.journal.lock().unwrap().pressure.last_mut() {
            p.1 = Instant::now();
        }
    }
}
