//! A fleet in network namespaces: a router with a multipath route to the
//! service address over three ringlb instances, backends behind them, and
//! clients from many source addresses and ports. `ecmp_*` uses a static
//! resilient nexthop group; `bgp_*` runs BIRD on the router and on every
//! instance, with `ringlb announce` gating each instance's route on its
//! health. Both need root (network namespaces); without it, or without
//! `ip`/`bird`, they print why and return.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{path_str, ringlb_bin, wait_until, TempDir};

const VIP: &str = "10.14.100.1";
/// Instances in the fleet.
const LBS: usize = 3;
/// Backends configured at start (one more is added during the test).
const BACKENDS: usize = 4;
/// Client source addresses (10.14.0.100 + i) and ports per address.
const CLIENT_IPS: u32 = 64;
const PORTS: u16 = 4;

// === namespaces ===

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

fn sysctl(ns: &str, key: &str, value: &str) {
    ip(&["netns", "exec", ns, "sysctl", "-q", "-w", &format!("{key}={value}")]);
}

/// Why namespace tests cannot run here, if they cannot.
fn cannot_run(need_bird: bool) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    let probe = format!("i14probe{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => return Some(format!("cannot run ip: {e}")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "cannot create a network namespace: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        }
    }
    if need_bird {
        for bin in ["bird", "birdc"] {
            if Command::new(bin).arg("--version").output().is_err() {
                return Some(format!("{bin} not installed (apt-get install bird2; .ci/run does)"));
            }
        }
    }
    None
}

/// Network namespaces and processes, deleted and killed on drop (also when
/// the test fails).
struct Fleet {
    /// Namespaces by role: "c" client, "r" router, "b" backends, "l0".. instances.
    ns: BTreeMap<String, String>,
    children: Mutex<Vec<(String, Child)>>,
    dir: TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in self.children.get_mut().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.ns.values() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Opens a descriptor of namespace `ns` for setns.
fn ns_fd(ns: &str) -> std::fs::File {
    std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns")
}

/// Runs `f` on a thread that has entered namespace `ns`: every socket it
/// creates belongs to that namespace (and stays there when used elsewhere).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let fd = ns_fd(ns);
    thread::spawn(move || {
        // SAFETY: `fd` is an open namespace file; setns changes only this
        // (new, short-lived) thread's network namespace.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

impl Fleet {
    /// Builds the topology (see the module docs); `static_route` installs the
    /// router's resilient multipath route (the BGP test lets BIRD do it).
    fn new(tag: &str, static_route: bool) -> Fleet {
        let pid = std::process::id();
        let mut ns = BTreeMap::new();
        for role in ["c", "r", "b"]
            .into_iter()
            .map(String::from)
            .chain((0..LBS).map(|k| format!("l{k}")))
        {
            ns.insert(role.clone(), format!("i14{tag}{role}{pid}"));
        }
        let fleet = Fleet {
            ns,
            children: Mutex::new(Vec::new()),
            dir: TempDir::new(&format!("fleet-{tag}")),
        };
        for n in fleet.ns.values() {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
            sysctl(n, "net.ipv4.conf.all.rp_filter", "0");
            sysctl(n, "net.ipv4.conf.default.rp_filter", "0");
        }
        let (c, r, b) = (fleet.n("c"), fleet.n("r"), fleet.n("b"));
        sysctl(&r, "net.ipv4.ip_forward", "1");
        // L4 multipath hashing on the packet's 5-tuple. Policy 1 would
        // take a TCP packet's hash as the client's socket set it (veth keeps
        // skb->hash across namespaces, and policy 1 short-circuits on an L4
        // hash), and that hash is random per socket: the same 4-tuple would
        // take a random path each time, which no router on a wire does.
        // Policy 3 with fields src/dst address, protocol, src/dst port
        // (0x37) hashes the headers, as a router receiving from a wire does.
        sysctl(&r, "net.ipv4.fib_multipath_hash_policy", "3");
        sysctl(&r, "net.ipv4.fib_multipath_hash_fields", "0x0037");
        // client <-> router
        fleet.veth(&c, "eth0", "10.14.0.1/24", &r, "c0", "10.14.0.254/24");
        for i in 0..CLIENT_IPS {
            ip(&[
                "-n",
                &c,
                "addr",
                "add",
                &format!("10.14.0.{}/24", 100 + i),
                "dev",
                "eth0",
            ]);
        }
        ip(&["-n", &c, "route", "add", "default", "via", "10.14.0.254"]);
        for i in 1..=BACKENDS + 1 {
            ip(&["-n", &b, "addr", "add", &format!("10.14.50.{i}/32"), "dev", "lo"]);
        }
        for k in 0..LBS {
            let l = fleet.n(&format!("l{k}"));
            fleet.veth(
                &r,
                &format!("l{k}"),
                &format!("10.14.{}.1/24", k + 1),
                &l,
                "eth0",
                &format!("10.14.{}.2/24", k + 1),
            );
            ip(&["-n", &l, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
            ip(&[
                "-n",
                &l,
                "route",
                "add",
                "default",
                "via",
                &format!("10.14.{}.1", k + 1),
            ]);
            fleet.veth(
                &l,
                "b0",
                &format!("10.14.{}.1/24", 11 + k),
                &b,
                &format!("l{k}"),
                &format!("10.14.{}.2/24", 11 + k),
            );
            ip(&[
                "-n",
                &l,
                "route",
                "add",
                "10.14.50.0/24",
                "via",
                &format!("10.14.{}.2", 11 + k),
            ]);
        }
        if static_route {
            // Wait for carrier: a nexthop on a device without it is refused.
            assert!(wait_until(Duration::from_secs(5), || {
                Command::new("ip")
                    .args(["-n", &r, "nexthop", "add", "id", "1", "via", "10.14.1.2", "dev", "l0"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            }));
            for k in 1..LBS {
                ip(&[
                    "-n",
                    &r,
                    "nexthop",
                    "add",
                    "id",
                    &(k + 1).to_string(),
                    "via",
                    &format!("10.14.{}.2", k + 1),
                    "dev",
                    &format!("l{k}"),
                ]);
            }
            let group: Vec<String> = (1..=LBS).map(|k| k.to_string()).collect();
            // Resilient: removing an instance moves only its own buckets.
            ip(&[
                "-n",
                &r,
                "nexthop",
                "add",
                "id",
                "100",
                "group",
                &group.join("/"),
                "type",
                "resilient",
                "buckets",
                "512",
            ]);
            ip(&["-n", &r, "route", "add", &format!("{VIP}/32"), "nhid", "100"]);
        }
        fleet
    }

    fn n(&self, role: &str) -> String {
        self.ns[role].clone()
    }

    fn veth(&self, a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) {
        ip(&[
            "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        ip(&["-n", a, "addr", "add", a_addr, "dev", a_if]);
        ip(&["-n", b, "addr", "add", b_addr, "dev", b_if]);
        ip(&["-n", a, "link", "set", a_if, "up"]);
        ip(&["-n", b, "link", "set", b_if, "up"]);
    }

    /// Starts `cmd ARGS` in namespace `role`, stderr to `log`, killed on drop.
    fn spawn(&self, role: &str, name: &str, args: &[&str], log: &Path) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.n(role)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
            .stderr(std::fs::File::create(log).unwrap());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().expect("spawn in namespace");
        let pid = child.id();
        self.children.lock().unwrap().push((name.to_string(), child));
        pid
    }

    /// Signals the child `name` (ip netns exec execs it, so the pid is its own).
    fn signal(&self, name: &str, sig: i32) {
        let children = self.children.lock().unwrap();
        let (_, c) = children.iter().find(|(n, _)| n == name).expect("child");
        // SAFETY: signals a child this test started and has not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    /// Waits for the child `name` to exit.
    fn wait(&self, name: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let mut children = self.children.lock().unwrap();
            let (_, c) = children.iter_mut().find(|(n, _)| n == name).expect("child");
            matches!(c.try_wait(), Ok(Some(_)))
        })
    }

    fn sock(&self, k: usize) -> PathBuf {
        self.dir.0.join(format!("l{k}.sock"))
    }

    /// Starts ringlb instance `k` with the fleet's config (identical on
    /// every instance but for the control socket) and waits until it answers.
    fn start_lb(&self, k: usize) {
        let mut pools = String::new();
        for (pool, port, check) in [("web", 80, "tcp"), ("game", 53, "none")] {
            pools.push_str(&format!(
                "[[pool]]\nname = \"{pool}\"\ntable_size = 65537\ndrain_timeout = \"1s\"\n[pool.health_check]\nkind = \"{check}\"\ninterval = \"500ms\"\n"
            ));
            for i in 1..=BACKENDS {
                pools.push_str(&format!("[[pool.backend]]\naddr = \"10.14.50.{i}:{port}\"\n"));
            }
        }
        let config = format!(
            "[runtime]\nworkers = 1\nshutdown_timeout = \"5s\"\n\n[control]\nsocket = \"{}\"\n\n\
             [[listener]]\nname = \"web\"\nbind = \"{VIP}:80\"\npool = \"web\"\nhash_key = \"src_ip_port\"\nconnect_timeout = \"1s\"\n\n\
             [[listener]]\nname = \"game\"\nbind = \"{VIP}:53\"\nprotocol = \"udp\"\npool = \"game\"\nhash_key = \"src_ip\"\n\n{pools}",
            self.sock(k).display()
        );
        let path = self.dir.file(&format!("l{k}.toml"), &config);
        let log = self.dir.0.join(format!("l{k}.log"));
        self.spawn(
            &format!("l{k}"),
            &format!("lb{k}"),
            &[ringlb_bin(), "run", "-c", path_str(&path)],
            &log,
        );
        let sock = self.sock(k);
        assert!(
            wait_until(Duration::from_secs(15), || ctl(
                &sock,
                &serde_json::json!({"cmd": "status"})
            )
            .is_ok()),
            "instance {k} did not answer: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Backends in their namespace: TCP on 10.14.50.i:80 writes `bI FROM\n`
    /// (FROM = the instance's address) and echoes; UDP on :53 answers
    /// `PAYLOAD|uI FROM`.
    fn start_backends(&self, stop: &Arc<AtomicBool>) {
        let (tcp, udp): (Vec<TcpListener>, Vec<UdpSocket>) = in_ns(&self.n("b"), || {
            let t = (1..=BACKENDS + 1)
                .map(|i| TcpListener::bind(format!("10.14.50.{i}:80")).unwrap())
                .collect();
            let u = (1..=BACKENDS + 1)
                .map(|i| UdpSocket::bind(format!("10.14.50.{i}:53")).unwrap())
                .collect();
            (t, u)
        });
        for (i, l) in tcp.into_iter().enumerate() {
            let stop = stop.clone();
            thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut s) = s else { continue };
                    thread::spawn(move || {
                        let from = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                        if s.write_all(format!("b{} {from}\n", i + 1).as_bytes()).is_err() {
                            return;
                        }
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        for (i, u) in udp.into_iter().enumerate() {
            let stop = stop.clone();
            thread::spawn(move || {
                u.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        let mut reply = buf[..n].to_vec();
                        reply.extend_from_slice(format!("|u{} {}", i + 1, from.ip()).as_bytes());
                        let _ = u.send_to(&reply, from);
                    }
                }
            });
        }
    }
}

/// One request on a control socket (a fresh connection, 5 s timeouts).
fn ctl(sock: &Path, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| e.to_string())
}

/// `ctl route` for many clients over one connection: the chosen backend of each.
fn routes(sock: &Path, listener: &str, clients: &[SocketAddr]) -> Vec<String> {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    clients
        .iter()
        .map(|c| {
            let req = serde_json::json!({"cmd": "route", "listener": listener, "client": c.to_string()});
            w.write_all(format!("{req}\n").as_bytes()).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            v["chosen"].as_str().unwrap_or("-").to_string()
        })
        .collect()
}

fn clients(port_base: u16) -> Vec<SocketAddr> {
    (0..CLIENT_IPS)
        .flat_map(|i| {
            (0..PORTS).map(move |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 14, 0, 100 + i as u8)), port_base + p))
        })
        .collect()
}

/// What a client saw: the backend (`10.14.50.I:PORT`) and the instance (0..).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    backend: String,
    instance: usize,
}

fn parse_seen(tag: &str, port: u16) -> Option<Seen> {
    // "bI 10.14.1K.1" or "...|uI 10.14.1K.1"
    let tag = tag.rsplit('|').next()?.trim();
    let (b, from) = tag.split_once(' ')?;
    let i: usize = b[1..].parse().ok()?;
    let third: usize = from.split('.').nth(2)?.parse().ok()?;
    Some(Seen {
        backend: format!("10.14.50.{i}:{port}"),
        instance: third.checked_sub(11)?,
    })
}

/// One TCP connection from `from` to the service: reads the tag, then
/// resets (no TIME_WAIT anywhere, so the same 4-tuple can come again).
fn tcp_once(from: SocketAddr) -> Result<Seen, String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    sock.set_reuse_address(true).ok();
    sock.bind(&from.into()).map_err(|e| format!("bind {from}: {e}"))?;
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    sock.connect_timeout(&vip.into(), Duration::from_secs(2))
        .map_err(|e| format!("connect from {from}: {e}"))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read from {from}: {e}"))?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).ok();
    parse_seen(&line, 80).ok_or_else(|| format!("from {from}: bad tag {line:?}"))
}

fn udp_once(from: SocketAddr) -> Result<Seen, String> {
    let s = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let mut buf = [0u8; 256];
    // A datagram can be lost while a route changes: three tries.
    for _ in 0..3 {
        s.send_to(b"q", vip).map_err(|e| e.to_string())?;
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            return parse_seen(&text, 53).ok_or_else(|| format!("bad reply {text:?}"));
        }
    }
    Err(format!("no UDP reply to {from}"))
}

/// Every client once over TCP and UDP, from the client namespace.
fn round(fleet: &Fleet, tcp: &[SocketAddr], udp: &[SocketAddr]) -> (Vec<Seen>, Vec<Seen>) {
    let (tcp, udp) = (tcp.to_vec(), udp.to_vec());
    in_ns(&fleet.n("c"), move || {
        let t = tcp.iter().map(|c| tcp_once(*c).unwrap()).collect();
        let u = udp.iter().map(|c| udp_once(*c).unwrap()).collect();
        (t, u)
    })
}

fn per_instance(seen: &[Seen]) -> Vec<usize> {
    let mut n = vec![0; LBS];
    for s in seen {
        n[s.instance] += 1;
    }
    n
}

/// Fraction of clients whose backend differs.
fn moved(a: &[Seen], b: &[Seen]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x.backend != y.backend).count() as f64 / a.len() as f64
}

#[test]
fn ecmp_fleet_same_backend_from_any_instance() {
    if let Some(why) = cannot_run(false) {
        println!("SKIPPED ecmp_fleet_same_backend_from_any_instance: {why}");
        return;
    }
    let fleet = Fleet::new("e", true);
    let stop = Arc::new(AtomicBool::new(false));
    fleet.start_backends(&stop);
    for k in 0..LBS {
        fleet.start_lb(k);
    }
    let (tcp_clients, udp_clients) = (clients(41000), clients(42000));
    let socks: Vec<PathBuf> = (0..LBS).map(|k| fleet.sock(k)).collect();

    // 1. Same backend whichever instance the router picked, and what each
    //    instance's `ctl route` says for that client.
    let (t0, u0) = round(&fleet, &tcp_clients, &udp_clients);
    let spread = per_instance(&t0);
    println!("ecmp: TCP clients per instance {spread:?}, UDP {:?}", per_instance(&u0));
    assert!(spread.iter().all(|n| *n > 0), "the router used every path: {spread:?}");
    assert!(per_instance(&u0).iter().all(|n| *n > 0));
    let mut agree = 0;
    for sock in &socks {
        let rt = routes(sock, "web", &tcp_clients);
        let ru = routes(sock, "game", &udp_clients);
        agree += t0.iter().zip(&rt).filter(|(s, r)| s.backend == **r).count();
        agree += u0.iter().zip(&ru).filter(|(s, r)| s.backend == **r).count();
    }
    let total = LBS * (tcp_clients.len() + udp_clients.len());
    println!("ecmp: same-backend rate across instances: {agree}/{total}");
    assert_eq!(
        agree, total,
        "every instance routes every client to the backend it reached"
    );

    // fleet check agrees, then catches a diverged instance.
    let fleet_check = |extra: &[&str]| {
        let mut args = vec!["fleet", "check"];
        let s: Vec<String> = socks.iter().map(|p| p.display().to_string()).collect();
        args.extend(s.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let out = Command::new(ringlb_bin()).args(&args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(fleet_check(&[]).0, Some(0));
    let req = |cmd: &str, addr: &str| serde_json::json!({"cmd": cmd, "pool": "web", "addr": addr});
    assert_eq!(ctl(&socks[2], &req("disable", "10.14.50.3:80")).unwrap()["ok"], true);
    let (code, out) = fleet_check(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "{}: pool \"web\": backend 10.14.50.3:80 is not usable (disabled) here",
            socks[2].display()
        )),
        "{out}"
    );
    assert_eq!(ctl(&socks[2], &req("enable", "10.14.50.3:80")).unwrap()["ok"], true);
    assert_eq!(fleet_check(&[]).0, Some(0));

    // 2. A backend added on every instance: ~1/(N+1) of the keys move, onto
    //    it; established connections are not touched.
    let what_if = ctl(
        &socks[0],
        &serde_json::json!({"cmd": "what_if", "pool": "web", "change": "add", "addr": "10.14.50.5:80"}),
    )
    .unwrap();
    let predicted = what_if["key_space"][0]["moved_fraction"].as_f64().unwrap();
    let established: Vec<TcpStream> = in_ns(&fleet.n("c"), || {
        (0..12)
            .map(|i| {
                let s =
                    TcpStream::connect_timeout(&format!("{VIP}:80").parse().unwrap(), Duration::from_secs(2)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                let _ = i;
                s
            })
            .collect()
    });
    for sock in &socks {
        let r = ctl(
            sock,
            &serde_json::json!({"cmd": "add", "pool": "web", "addr": "10.14.50.5:80"}),
        )
        .unwrap();
        assert_eq!(r["ok"], true, "{r}");
        let r = ctl(
            sock,
            &serde_json::json!({"cmd": "add", "pool": "game", "addr": "10.14.50.5:53"}),
        )
        .unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    let (t_add, _) = round(&fleet, &tcp_clients, &[]);
    let measured = moved(&t0, &t_add);
    let onto_new = t0
        .iter()
        .zip(&t_add)
        .filter(|(a, b)| a.backend != b.backend && b.backend == "10.14.50.5:80")
        .count();
    let moved_n = t0.iter().zip(&t_add).filter(|(a, b)| a.backend != b.backend).count();
    println!(
        "ecmp: backend added on every instance: {measured:.3} of {} TCP keys moved ({onto_new} of {moved_n} onto the new backend); what-if predicted {predicted:.4}",
        t0.len()
    );
    assert!((predicted - 0.2).abs() < 0.01, "{what_if}");
    assert!((measured - predicted).abs() < 0.09, "{measured} vs {predicted}");
    assert!(onto_new * 100 >= moved_n * 95);
    for (i, mut s) in established.into_iter().enumerate() {
        let msg = format!("still here {i}\n");
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("established connection {i} broken by the add: {e}"));
        assert_eq!(back, msg.as_bytes());
    }
    // Removed again: everyone is back where they were.
    for sock in &socks {
        for (pool, addr) in [("web", "10.14.50.5:80"), ("game", "10.14.50.5:53")] {
            let r = ctl(sock, &serde_json::json!({"cmd": "remove", "pool": pool, "addr": addr})).unwrap();
            assert_eq!(r["ok"], true, "{r}");
        }
    }
    let (t_back, _) = round(&fleet, &tcp_clients, &[]);
    println!(
        "ecmp: backend removed again: {:.3} of the TCP keys moved",
        moved(&t_add, &t_back)
    );
    assert_eq!(moved(&t0, &t_back), 0.0, "the same backend set routes as before");

    // 3. An instance taken out of the route moves only its own clients, and
    //    they reach the same backends (the tables are the same everywhere).
    ip(&["-n", &fleet.n("r"), "nexthop", "del", "id", "3"]);
    let (t1, u1) = round(&fleet, &tcp_clients, &udp_clients);
    let stayed = |before: &[Seen], after: &[Seen]| {
        before
            .iter()
            .zip(after)
            .filter(|(a, _)| a.instance != 2)
            .all(|(a, b)| a.instance == b.instance)
    };
    let changed = |before: &[Seen], after: &[Seen]| {
        before
            .iter()
            .zip(after)
            .filter(|(a, b)| a.instance != 2 && a.instance != b.instance)
            .count()
    };
    assert!(
        stayed(&t0, &t1) && stayed(&u0, &u1),
        "clients of the remaining instances stayed put: TCP {} and UDP {} moved",
        changed(&t0, &t1),
        changed(&u0, &u1)
    );
    assert!(t1.iter().chain(&u1).all(|s| s.instance != 2));
    assert_eq!(
        moved(&t0, &t1),
        0.0,
        "TCP (src_ip_port) clients reach the same backends"
    );
    assert_eq!(moved(&u0, &u1), 0.0, "UDP (src_ip) clients reach the same backends");
    let moved_instance = t0.iter().zip(&t1).filter(|(a, b)| a.instance != b.instance).count();
    println!(
        "ecmp: instance 2 out of the route: {moved_instance} of {} TCP clients changed instance (instance 2 had {}), 0 changed backend",
        t0.len(),
        spread[2]
    );

    // 4. And one killed.
    fleet.signal("lb1", libc::SIGKILL);
    assert!(fleet.wait("lb1", Duration::from_secs(5)));
    ip(&["-n", &fleet.n("r"), "nexthop", "del", "id", "2"]);
    let (t2, u2) = round(&fleet, &tcp_clients, &udp_clients);
    assert!(t2.iter().chain(&u2).all(|s| s.instance == 0));
    assert_eq!(moved(&t0, &t2), 0.0);
    assert_eq!(moved(&u0, &u2), 0.0);
    println!("ecmp: instance 1 killed: all clients on instance 0, 0 changed backend");
    stop.store(true, Ordering::SeqCst);
}

// === BGP ===

/// The router's paths to the service address: the next hops of its route.
fn paths(fleet: &Fleet) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", &fleet.n("r"), "route", "show", &format!("{VIP}/32")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut via: Vec<String> = words
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    via.sort();
    via
}

fn bird_config(router_id: &str, body: &str) -> String {
    // Fast timers so that a session comes up and a withdrawal travels in
    // about a second on a loaded machine.
    format!("router id {router_id};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n{body}")
}

fn bgp_session(name: &str, local: &str, local_as: u32, peer: &str, peer_as: u32, channel: &str) -> String {
    format!(
        "protocol bgp {name} {{\n  local {local} as {local_as};\n  neighbor {peer} as {peer_as};\n  hold time 3;\n  keepalive time 1;\n  connect delay time 1;\n  connect retry time 1;\n  error wait time 1, 2;\n  ipv4 {{ {channel} }};\n}}\n"
    )
}

/// Starts BIRD in `role`'s namespace with `config`; returns its control socket.
fn start_bird(fleet: &Fleet, role: &str, config: &str) -> PathBuf {
    let conf = fleet.dir.file(&format!("bird-{role}.conf"), config);
    let sock = fleet.dir.0.join(format!("bird-{role}.ctl"));
    let pid = fleet.dir.0.join(format!("bird-{role}.pid"));
    let log = fleet.dir.0.join(format!("bird-{role}.log"));
    fleet.spawn(
        role,
        &format!("bird-{role}"),
        &[
            "bird",
            "-f",
            "-c",
            path_str(&conf),
            "-s",
            path_str(&sock),
            "-P",
            path_str(&pid),
        ],
        &log,
    );
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "bird in {role} did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    sock
}

/// One attempt of the load: when it started, when it ended, and how it went.
struct Attempt {
    start: Instant,
    result: Result<(), String>,
}

/// New TCP connections (read the tag, reset) from the client namespace,
/// from `threads` threads each on its own source address, until stopped.
fn load(fleet: &Fleet, threads: u8, stop: &Arc<AtomicBool>) -> Vec<thread::JoinHandle<Vec<Attempt>>> {
    (0..threads)
        .map(|t| {
            let stop = stop.clone();
            let fd = ns_fd(&fleet.n("c"));
            thread::spawn(move || {
                // SAFETY: as in `in_ns`: an open namespace file, this thread only.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0);
                let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 14, 0, 100 + t)), 0);
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    let result = tcp_once(from).map(|_| ());
                    out.push(Attempt { start, result });
                    thread::sleep(Duration::from_millis(5));
                }
                out
            })
        })
        .collect()
}

#[test]
fn bgp_health_gated_announcement_withdraws_on_stop() {
    if let Some(why) = cannot_run(true) {
        println!("SKIPPED bgp_health_gated_announcement_withdraws_on_stop: {why}");
        return;
    }
    let fleet = Fleet::new("g", false);
    let backends_stop = Arc::new(AtomicBool::new(false));
    fleet.start_backends(&backends_stop);
    let mut router = String::from("protocol kernel {\n  ipv4 { import none; export all; };\n  merge paths yes;\n}\n");
    for k in 0..LBS {
        router.push_str(&bgp_session(
            &format!("lb{k}"),
            &format!("10.14.{}.1", k + 1),
            65000,
            &format!("10.14.{}.2", k + 1),
            65001,
            "import all; export none;",
        ));
    }
    start_bird(&fleet, "r", &bird_config("10.14.0.254", &router));
    let started = Instant::now();
    for k in 0..LBS {
        fleet.start_lb(k);
        let role = format!("l{k}");
        // The service prefix lives in a static protocol that starts
        // disabled: only `ringlb announce` enables it.
        let body = format!(
            "protocol static svc {{\n  disabled yes;\n  ipv4;\n  route {VIP}/32 blackhole;\n}}\n{}",
            bgp_session(
                "up",
                &format!("10.14.{}.2", k + 1),
                65001,
                &format!("10.14.{}.1", k + 1),
                65000,
                "import none; export where proto = \"svc\"; next hop self;",
            )
        );
        let bird_sock = start_bird(&fleet, &role, &bird_config(&format!("10.14.{}.2", k + 1), &body));
        let log = fleet.dir.0.join(format!("announce-l{k}.log"));
        fleet.spawn(
            &role,
            &format!("announce{k}"),
            &[
                ringlb_bin(),
                "announce",
                "-s",
                path_str(&fleet.sock(k)),
                "--pool",
                "web",
                "--bird-socket",
                path_str(&bird_sock),
                "--protocol",
                "svc",
                "--interval",
                "200ms",
                "--timeout",
                "500ms",
            ],
            &log,
        );
    }
    let all: Vec<String> = (1..=LBS).map(|k| format!("10.14.{k}.2")).collect();
    let logs = || {
        let mut s = String::new();
        for f in std::fs::read_dir(&fleet.dir.0).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "log") {
                s.push_str(&format!(
                    "== {}\n{}\n",
                    f.path().display(),
                    std::fs::read_to_string(f.path()).unwrap_or_default()
                ));
            }
        }
        s
    };
    assert!(
        wait_until(Duration::from_secs(40), || paths(&fleet) == all),
        "the router never had a path over every instance: {:?}\n{}",
        paths(&fleet),
        logs()
    );
    println!(
        "bgp: multipath route over {} instances {:.1}s after start",
        LBS,
        started.elapsed().as_secs_f64()
    );

    // A pool with no usable backend withdraws its instance's route, and
    // the route comes back once the pool can serve again.
    let sock1 = fleet.sock(1);
    let web = |cmd: &str, i: usize| serde_json::json!({"cmd": cmd, "pool": "web", "addr": format!("10.14.50.{i}:80"), "force": true});
    let t = Instant::now();
    for i in 1..=BACKENDS {
        assert_eq!(ctl(&sock1, &web("disable", i)).unwrap()["ok"], true);
    }
    let without1: Vec<String> = all.iter().filter(|a| *a != "10.14.2.2").cloned().collect();
    assert!(
        wait_until(Duration::from_secs(10), || paths(&fleet) == without1),
        "{:?}\n{}",
        paths(&fleet),
        logs()
    );
    let gated = t.elapsed();
    let t = Instant::now();
    for i in 1..=BACKENDS {
        let mut req = web("enable", i);
        req.as_object_mut().unwrap().remove("force");
        assert_eq!(ctl(&sock1, &req).unwrap()["ok"], true);
    }
    assert!(
        wait_until(Duration::from_secs(10), || paths(&fleet) == all),
        "{:?}",
        paths(&fleet)
    );
    println!(
        "bgp: pool without a usable backend: route withdrawn in {:.2}s, back {:.2}s after the pool recovered",
        gated.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    // A client load across the stop of instance 2.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, 8, &stop);
    thread::sleep(Duration::from_millis(1500));
    let stopped_at = Instant::now();
    fleet.signal("lb2", libc::SIGTERM);
    let without2: Vec<String> = all.iter().filter(|a| *a != "10.14.3.2").cloned().collect();
    assert!(
        wait_until(Duration::from_secs(10), || paths(&fleet) == without2),
        "no withdrawal: {:?}\n{}",
        paths(&fleet),
        logs()
    );
    let converged_at = Instant::now();
    thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::SeqCst);
    let attempts: Vec<Attempt> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let before: Vec<&Attempt> = attempts.iter().filter(|a| a.start < converged_at).collect();
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.start >= converged_at).collect();
    let failed = |v: &[&Attempt]| v.iter().filter(|a| a.result.is_err()).count();
    let failed_during = attempts
        .iter()
        .filter(|a| a.start >= stopped_at && a.start < converged_at && a.result.is_err())
        .count();
    let convergence = converged_at.duration_since(stopped_at);
    println!(
        "bgp: SIGTERM to instance 2 -> route withdrawn on the router in {:.3}s; new connections: {} before convergence ({} failed, {failed_during} of them after the stop), {} after ({} failed)",
        convergence.as_secs_f64(),
        before.len(),
        failed(&before),
        after.len(),
        failed(&after)
    );
    let first_errors: Vec<&String> = after.iter().filter_map(|a| a.result.as_ref().err()).take(5).collect();
    assert_eq!(failed(&after), 0, "failed after convergence: {first_errors:?}");
    assert!(after.len() > 50, "the load kept running: {}", after.len());
    assert!(convergence < Duration::from_secs(5), "{convergence:?}");
    assert!(fleet.wait("lb2", Duration::from_secs(10)));

    // A planned stop: `ringlb announce` first (it withdraws on SIGTERM), then
    // ringlb once the route has converged. Only connections in flight whose
    // router path moves (hash-threshold ECMP) can fail.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, 8, &stop);
    thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    fleet.signal("announce0", libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || paths(&fleet)
            == vec!["10.14.2.2".to_string()]),
        "{:?}\n{}",
        paths(&fleet),
        logs()
    );
    let withdrawn = t.elapsed();
    assert!(fleet.wait("announce0", Duration::from_secs(5)));
    thread::sleep(Duration::from_millis(300));
    let lb_stopped_at = Instant::now();
    fleet.signal("lb0", libc::SIGTERM);
    assert!(fleet.wait("lb0", Duration::from_secs(10)));
    thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let attempts: Vec<Attempt> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let failed_route = attempts
        .iter()
        .filter(|a| a.start < lb_stopped_at && a.result.is_err())
        .count();
    let failed_stop = attempts
        .iter()
        .filter(|a| a.start >= lb_stopped_at && a.result.is_err())
        .count();
    println!(
        "bgp: planned stop of instance 0 (announce first): route withdrawn in {:.3}s; {} new connections, {failed_route} failed while the route moved, {failed_stop} after ringlb was stopped",
        withdrawn.as_secs_f64(),
        attempts.len()
    );
    assert_eq!(failed_stop, 0, "no client reaches an instance whose route is gone");

    // An instance that dies without a word: its control socket stops
    // answering and the route goes.
    let killed_at = Instant::now();
    fleet.signal("lb1", libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || paths(&fleet).is_empty()),
        "{:?}",
        paths(&fleet)
    );
    println!(
        "bgp: SIGKILL to instance 1 -> route withdrawn in {:.3}s",
        killed_at.elapsed().as_secs_f64()
    );
    backends_stop.store(true, Ordering::SeqCst);
}

#[test]
fn bgp_example_configs_parse() {
    if Command::new("bird").arg("--version").output().is_err() {
        println!("SKIPPED bgp_example_configs_parse: bird not installed (apt-get install bird2; .ci/run does)");
        return;
    }
    for f in ["config/bird-instance.conf", "config/bird-router.conf"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let out = Command::new("bird").arg("-p").arg("-c").arg(&path).output().unwrap();
        assert!(out.status.success(), "{f}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
