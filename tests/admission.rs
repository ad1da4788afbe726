//! Admission control through the real binary: per-source token buckets,
//! connection limits with spill-over, and overload shedding.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

type Lb = Controlled;

fn start(listener_extra: &str, backends: &[(SocketAddr, &str)], pool_extra: &str) -> Lb {
    let listen = lb_addr();
    let mut body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nconnect_timeout = \"1s\"\n{listener_extra}\n\n[[pool]]\nname = \"web\"\n{pool_extra}\n"
    );
    for (b, extra) in backends {
        body.push_str(&format!("[[pool.backend]]\naddr = \"{b}\"\n{extra}\n"));
    }
    start_controlled("auto", &body, listen)
}

/// Whether one connection from `from` is served (reads the backend's tag).
fn served(lb: SocketAddr, from: IpAddr) -> bool {
    read_tag(lb, Some(from)).is_ok()
}

fn refused_count(lb: &Lb, reason: &str) -> u64 {
    ctl_json(&lb.sock, &["stats"]).1["listeners"][0]["refused"][reason]
        .as_u64()
        .unwrap()
}

#[test]
fn a_source_over_its_rate_is_refused_while_another_is_served() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let lb = start(
        "[listener.rate_limit]\nper_source_rate = 2\nper_source_burst = 10\n",
        &[(b.addr, "")],
        "",
    );
    let noisy: IpAddr = [127, 0, 5, 1].into();
    let quiet: IpAddr = [127, 0, 5, 2].into();
    let started = Instant::now();
    let mut admitted = 0;
    let mut errors = std::collections::BTreeMap::new();
    for i in 0..40 {
        match read_tag(lb.listen, Some(noisy)) {
            Ok(_) => admitted += 1,
            Err(e) => *errors.entry(format!("{:?}: {e}", e.kind())).or_insert(0) += 1,
        }
        if i % 8 == 0 {
            let r = read_tag(lb.listen, Some(quiet));
            assert!(
                r.is_ok(),
                "the quiet source is served while the noisy one is limited: round {i}: {r:?}: {}",
                ctl_json(&lb.sock, &["stats"]).1
            );
        }
    }
    let allowed = 10.0 + 2.0 * started.elapsed().as_secs_f64();
    assert!(
        admitted >= 10 && admitted as f64 <= allowed + 1.0,
        "admitted {admitted}, burst 10 + rate 2/s allows {allowed:.1}"
    );
    // Every noisy connection ringlb accepted and did not serve, it refused
    // (almost all as rate_limited; the reasons are printed if not). Counted
    // from ringlb's side: once in a CI run one of the 40 failed at the client
    // without ever reaching ringlb's accept (`accepted` was one short), which
    // is the kernel's doing, not the limiter's; the client's errors are
    // printed should that happen again.
    let stats = ctl_json(&lb.sock, &["stats"]).1;
    let refused: u64 = stats["listeners"][0]["refused"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let quiet_served = 5;
    let noisy_accepted = stats["listeners"][0]["accepted"].as_u64().unwrap() - quiet_served;
    assert!(
        noisy_accepted >= 38 && refused >= noisy_accepted - admitted as u64,
        "{admitted} admitted, {refused} refused of {noisy_accepted} accepted; the client saw {errors:?}; {stats}"
    );
    assert!(refused_count(&lb, "rate_limited") >= 20, "{stats}");
    // Refused at once with a reset, not left hanging.
    // (The reset can even beat the client's connect() returning.)
    let t = Instant::now();
    if let Ok(mut s) = connect_from(lb.listen, Some(noisy)) {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 8];
        let r = s.read(&mut buf);
        assert!(
            matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn the_limit_holds_across_workers() {
    let b = Backend::start("a", Behaviour::TagEcho);
    // 2 workers: connections of one source spread over both by SO_REUSEPORT.
    let lb = start(
        "[listener.rate_limit]\nper_source_rate = 10\nper_source_burst = 20\n",
        &[(b.addr, "")],
        "",
    );
    let src: IpAddr = [127, 0, 6, 1].into();
    let started = Instant::now();
    let mut admitted = 0;
    while started.elapsed() < Duration::from_secs(2) {
        if served(lb.listen, src) {
            admitted += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let allowed = 20.0 + 10.0 * secs;
    println!("effective rate with 2 workers: {admitted} admitted in {secs:.2}s (burst 20 + 10/s allows {allowed:.0})");
    assert!(
        admitted as f64 <= allowed + 1.0,
        "{admitted} admitted: the per-source limit was multiplied by the workers"
    );
    assert!(admitted as f64 >= allowed * 0.8, "{admitted} admitted: too strict");
}

#[test]
fn per_backend_limit_spills_to_the_next_backend_and_listener_limit_refuses() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let lb = start(
        "hash_key = \"src_ip\"\nmax_connections = 5",
        &[(a.addr, "max_connections = 2"), (b.addr, "max_connections = 2")],
        "",
    );
    let client: IpAddr = [127, 0, 7, 1].into();
    // One client address: every connection prefers the same backend.
    let mut held = Vec::new();
    let mut tags = Vec::new();
    for _ in 0..4 {
        let mut s = connect_from(lb.listen, Some(client)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut tag = [0u8; 2];
        s.read_exact(&mut tag).unwrap();
        tags.push(tag[0] as char);
        held.push(s);
    }
    assert_eq!(tags.iter().filter(|&&t| t == 'a').count(), 2, "{tags:?}");
    assert_eq!(
        tags.iter().filter(|&&t| t == 'b').count(),
        2,
        "{tags:?}: 2 on the preferred one, then spill-over"
    );
    // Both backends full: the 5th is refused at once.
    let t = Instant::now();
    assert!(read_tag(lb.listen, Some(client)).is_err());
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(refused_count(&lb, "backend_full"), 1);
    // Free one slot on each backend; the listener limit (5) now bites first.
    held.truncate(3);
    thread::sleep(Duration::from_millis(200));
    let _fourth = read_tag(lb.listen, Some(client)).map(|_| ());
    let mut extra = Vec::new();
    for _ in 0..3 {
        if let Ok(s) = connect_from(lb.listen, Some(client)) {
            extra.push(s);
        }
    }
    thread::sleep(Duration::from_millis(300));
    assert!(refused_count(&lb, "listener_full") + refused_count(&lb, "backend_full") >= 2);
    drop(held);
}

#[test]
fn max_connections_per_source() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let lb = start("max_connections_per_source = 2", &[(a.addr, "")], "");
    let one: IpAddr = [127, 0, 8, 1].into();
    let two: IpAddr = [127, 0, 8, 2].into();
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = connect_from(lb.listen, Some(one)).unwrap();
            let mut tag = [0u8; 2];
            s.read_exact(&mut tag).unwrap();
            s
        })
        .collect();
    assert!(
        !served(lb.listen, one),
        "a third connection from the same source is refused"
    );
    assert!(served(lb.listen, two), "another source is not affected");
    assert_eq!(refused_count(&lb, "source_limit"), 1);
    drop(held);
    thread::sleep(Duration::from_millis(200));
    assert!(
        served(lb.listen, one),
        "the source is served again once its connections closed"
    );
}

#[test]
fn thousands_of_distinct_sources_stay_within_the_table_cap_and_limited_sources_stay_limited() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let lb = start(
        "[listener.rate_limit]\nper_source_rate = 0.001\nper_source_burst = 3\nmax_sources = 1000\n",
        &[(a.addr, "")],
        "",
    );
    let attacker: IpAddr = [127, 9, 0, 1].into();
    let mut admitted = 0;
    for _ in 0..10 {
        if served(lb.listen, attacker) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3, "burst of 3");
    // 3,000 distinct sources, one connection each, from 127.10.x.y.
    let mut flood_served = 0;
    for i in 0..3000u32 {
        let ip: IpAddr = [127, 10, (i / 250) as u8, (i % 250 + 1) as u8].into();
        if served(lb.listen, ip) {
            flood_served += 1;
        }
        if i % 500 == 0 {
            assert!(
                !served(lb.listen, attacker),
                "the limited source stays limited during the flood ({i})"
            );
        }
    }
    let stats = ctl_json(&lb.sock, &["stats"]).1;
    let sources = &stats["listeners"][0]["sources"];
    println!("source table after 3,000 sources: {sources}; {flood_served} of the flood served");
    assert!(sources["tracked"].as_u64().unwrap() <= 1000, "{sources}");
    assert!(sources["capacity"].as_u64().unwrap() <= 1000);
    assert!(!served(lb.listen, attacker), "still limited after the flood");
    assert!(flood_served > 0);
}

#[test]
fn emfile_keeps_established_connections_and_recovers() {
    emfile_keeps_established_connections_and_recovers_on("epoll");
}

#[test]
fn emfile_keeps_established_connections_and_recovers_io_uring() {
    emfile_keeps_established_connections_and_recovers_on("uring");
}

fn emfile_keeps_established_connections_and_recovers_on(engine: &str) {
    let stall = Backend::start("echo", Behaviour::Echo);
    let dir = TempDir::new("emfile");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\n\
         [pool.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nfall = 2\n\
         [[pool.backend]]\naddr = \"{}\"\n",
        stall.addr
    );
    let cfg = dir.file("c.toml", &config_with_control(engine, &sock, &body));
    // A low hard limit ringlb cannot raise: 64 descriptors in all.
    let mut cmd = std::process::Command::new(ringlb_bin());
    cmd.args(["run", "-c", path_str(&cfg)]).env("RUST_LOG", "error");
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let mut lb = Ringlb {
        child,
        dir: TempDir::new("emfile2"),
        config: cfg.clone(),
    };
    lb.wait_listening(listen);
    assert!(
        wait_until(Duration::from_secs(10), || read_tag_echo(listen)),
        "ringlb serves before the test"
    );
    // Fill the descriptor table with established, echoing connections.
    let mut established = Vec::new();
    for _ in 0..60 {
        let Ok(mut s) = connect_from(listen, None) else { break };
        s.set_read_timeout(Some(Duration::from_millis(3000))).unwrap();
        if s.write_all(b"x").is_err() {
            break;
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) => established.push(s),
            _ => break,
        }
    }
    assert!(
        established.len() >= 10,
        "only {} connections before EMFILE",
        established.len()
    );
    // Each relayed connection holds two descriptors, so one may be left
    // over; idle control-socket clients take what remains, so from here on
    // ringlb has none to spare (as it does on a busy day).
    let pid = lb.child.id();
    // Descriptors below the limit: one inherited above it (cargo's jobserver
    // pipe, say) does not take a slot.
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&fd| fd < 64)
                .count()
        })
    };
    // A health check holds a descriptor for a moment every 100 ms: the
    // fewest seen over 100 ms is what is really in use.
    let settled_fds = || {
        (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                open_fds()
            })
            .min()
            .unwrap()
    };
    // Threads racing for a freed descriptor can leave one free again later
    // (a spare not yet taken back): this takes it.
    let mut idle_control_clients = Vec::new();
    let mut take_free_fds = || {
        for _ in settled_fds()..64 {
            idle_control_clients.push(std::os::unix::net::UnixStream::connect(&sock).unwrap());
        }
    };
    take_free_fds();
    assert!(
        wait_until(Duration::from_secs(3), || settled_fds() == 64),
        "ringlb has {} of 64 descriptors open",
        settled_fds()
    );
    // Past the limit: a new client is refused quickly, not left hanging.
    let t = Instant::now();
    // The reset can beat the client's connect() returning.
    let r = connect_from(listen, None).and_then(|mut extra| {
        extra.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = extra.write_all(b"y");
        let mut b = [0u8; 1];
        extra.read(&mut b)
    });
    assert!(!matches!(r, Ok(1)), "served past EMFILE?");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refusal took {:?}: {r:?}",
        t.elapsed()
    );
    // Established connections still relay.
    for s in established.iter_mut().take(5) {
        s.write_all(b"z").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"z");
    }
    // The control socket still answers: it keeps descriptors in reserve.
    let (code, stats) = ctl_json(&sock, &["stats"]);
    assert_eq!(code, 0, "ctl stats at EMFILE: {stats}");
    assert!(
        stats["listeners"][0]["refused"]["overloaded"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // Checks keep running at EMFILE; one that cannot get a socket says
    // nothing about the backend, which stays in service (fall = 2 at 100 ms
    // would have taken it out within 200 ms of failures).
    let backend = || ctl_json(&sock, &["backends"]).1["pools"][0]["backends"][0].clone();
    let not_run = |b: &serde_json::Value| {
        b["last_check"]["ok"].is_null()
            && b["last_check"]["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("not run"))
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            take_free_fds();
            not_run(&backend())
        }),
        "checks meet EMFILE: {}",
        backend()
    );
    std::thread::sleep(Duration::from_millis(500));
    let b = backend();
    assert_eq!(b["state"], "active", "{b}");
    assert!(
        wait_until(Duration::from_secs(5), || {
            take_free_fds();
            ctl_text(&sock, &["backends"]).1.contains("last check not run: ")
        }),
        "{}",
        ctl_text(&sock, &["backends"]).1
    );
    // Pressure ends: accepting resumes by itself.
    drop(established);
    drop(idle_control_clients);
    assert!(
        wait_until(Duration::from_secs(3), || read_tag_echo(listen)),
        "accepting resumed"
    );
    let _ = &mut lb;
}

fn read_tag_echo(listen: SocketAddr) -> bool {
    let Ok(mut s) = connect_from(listen, None) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    let mut b = [0u8; 1];
    s.write_all(b"q").is_ok() && s.read_exact(&mut b).is_ok()
}
