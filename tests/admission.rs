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

/// Starts ringlb on `cfg` with a hard descriptor limit it cannot raise.
fn start_with_fd_limit(cfg: &std::path::Path, limit: u64) -> Ringlb {
    let mut cmd = std::process::Command::new(ringlb_bin());
    cmd.args(["run", "-c", path_str(cfg)]).env("RUST_LOG", "error");
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ringlb {
        child: cmd.spawn().unwrap(),
        dir: TempDir::new("fdlimit"),
        log: None,
        config: cfg.to_path_buf(),
    }
}

/// Under descriptor exhaustion every accepted connection still ends with
/// exactly one outcome: relayed, or refused with its reason (issue 17 item 7:
/// clients got a backend connection and then EOF, counted nowhere).
fn every_accepted_connection_has_one_outcome_at_emfile_on(engine: &str) {
    let echo = Backend::start("echo", Behaviour::Echo);
    let dir = TempDir::new("outcomes");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nrelay = \"auto\"\n\n[[pool]]\nname = \"web\"\n\
         [[pool.backend]]\naddr = \"{}\"\n",
        echo.addr
    );
    let cfg = dir.file("c.toml", &config_with_control(engine, &sock, &body));
    let mut lb = start_with_fd_limit(&cfg, 128);
    lb.wait_listening(listen);
    // 1,000 clients, 100 at a time, each holding its connection a moment:
    // 100 relayed connections would need 200 descriptors.
    let served = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..100 {
            scope.spawn(|| {
                for _ in 0..10 {
                    let ok = connect_from(listen, None).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(())
                    });
                    if ok.is_ok() {
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let stats = || ctl_json(&sock, &["stats"]).1["listeners"][0].clone();
    assert!(
        wait_until(Duration::from_secs(10), || stats()["active"] == 0),
        "connections end: {}",
        stats()
    );
    let l = stats();
    let refused: u64 = l["refused"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let (accepted, relayed) = (l["accepted"].as_u64().unwrap(), l["relayed"].as_u64().unwrap());
    assert_eq!(accepted, relayed + refused, "accepted = relayed + refused: {l}");
    assert!(
        l["refused"]["overloaded"].as_u64().unwrap() > 0,
        "descriptors ran out: {l}"
    );
    assert!(relayed >= served.load(std::sync::atomic::Ordering::Relaxed), "{l}");
    let _ = &mut lb;
}

#[test]
fn every_accepted_connection_has_one_outcome_at_emfile() {
    every_accepted_connection_has_one_outcome_at_emfile_on("epoll");
}

#[test]
fn every_accepted_connection_has_one_outcome_at_emfile_io_uring() {
    every_accepted_connection_has_one_outcome_at_emfile_on("uring");
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
    let mut lb = start_with_fd_limit(&cfg, 64);
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

/// Issue 17 item 4 at a small scale: 300 flooding addresses (each far over its
/// rate) against `max_sources = 64` must not lock out new or well-behaved
/// clients, and the refusals are counted under their real reasons.
#[test]
fn a_full_source_table_still_admits_new_and_well_behaved_sources() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let a = Backend::start("a", Behaviour::TagEcho);
    let (rate, burst) = (2.0, 4.0);
    let lb = start(
        &format!("[listener.rate_limit]\nper_source_rate = {rate}\nper_source_burst = {burst}\nmax_sources = 64\n"),
        &[(a.addr, "")],
        "",
    );
    let established: IpAddr = [127, 0, 12, 1].into();
    assert!(
        served(lb.listen, established),
        "the established client before the flood"
    );
    // 300 flooders from 127.13.x.y, round robin as fast as the connects go, six
    // connections a visit: each sends far above its 2/s, so every one of them is
    // being limited nearly all the time and none is ever idle.
    const FLOODERS: u32 = 300;
    let stop = Arc::new(AtomicBool::new(false));
    let flood_sent = Arc::new(AtomicU64::new(0));
    let flood_served = Arc::new(AtomicU64::new(0));
    let flood_started = Instant::now();
    let flooders: Vec<_> = (0..2u32)
        .map(|half| {
            let (stop, sent, ok, listen) = (stop.clone(), flood_sent.clone(), flood_served.clone(), lb.listen);
            thread::spawn(move || {
                let mut i = half;
                while !stop.load(Ordering::Relaxed) {
                    let n = i % FLOODERS;
                    let ip: IpAddr = [127, 13, (n / 200) as u8, (n % 200 + 1) as u8].into();
                    // A few in a row: more than the burst, so the visit leaves the
                    // source limited until its next one.
                    for _ in 0..6 {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if served(listen, ip) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 2;
                }
            })
        })
        .collect();
    // Let the flood fill the table with limited sources.
    thread::sleep(Duration::from_millis(800));
    let stats_before = ctl_json(&lb.sock, &["stats"]).1;
    // New one-shot clients (one connection each, from addresses never seen) and the
    // established client at half its rate, during the flood.
    let mut new_served = 0;
    let mut established_served = 0;
    const NEW: u32 = 20;
    for i in 0..NEW {
        let ip: IpAddr = [127, 14, 0, (i + 1) as u8].into();
        if served(lb.listen, ip) {
            new_served += 1;
        }
        if i % 5 == 0 && served(lb.listen, established) {
            established_served += 1;
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let stats = ctl_json(&lb.sock, &["stats"]).1;
    let l = &stats["listeners"][0];
    let sent = flood_sent.load(Ordering::Relaxed);
    let flood_ok = flood_served.load(Ordering::Relaxed);
    println!(
        "{sent} flood connections in {flood_secs:.1}s, {flood_ok} served; new {new_served}/{NEW}, \
         established {established_served}/4; before the clients: {}; after: {}",
        stats_before["listeners"][0]["sources"], l
    );
    assert!(
        sent as f64 >= 10.0 * rate * f64::from(FLOODERS) * 0.8,
        "the flood is too slow to be over its rate ({sent} in {flood_secs:.1}s): the test proves nothing"
    );
    assert!(
        new_served * 100 >= NEW * 95,
        "{new_served} of {NEW} new clients served during the flood: {l}"
    );
    assert_eq!(established_served, 4, "the well-behaved established client: {l}");
    // The flooders get at most what their buckets allow (burst + rate x time each),
    // within 10%.
    let allowed = f64::from(FLOODERS) * (burst + rate * flood_secs);
    assert!(
        flood_ok as f64 <= allowed * 1.1,
        "{flood_ok} flood connections served, their buckets allow {allowed:.0}"
    );
    // Refusals are counted by what refused them: the exact buckets (rate_limited)
    // for the flooders the table holds, the shared approximate buckets
    // (source_table_full) for the ones it could not hold.
    let refused = |r: &str| l["refused"][r].as_u64().unwrap_or(0);
    assert!(refused("rate_limited") > 0, "{l}");
    assert!(refused("source_table_full") > 0, "{l}");
    assert!(l["sources"]["tracked"].as_u64().unwrap() <= 64, "{l}");
}
