//! Control socket, `ringlb ctl`, reload, metrics and graceful shutdown,
//! through the real binary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn pool_block(name: &str, backends: &[SocketAddr], extra: &str) -> String {
    let mut s = format!("[[pool]]\nname = \"{name}\"\ntable_size = 65537\ndrain_timeout = \"1s\"\n{extra}\n");
    for b in backends {
        s.push_str(&format!("[[pool.backend]]\naddr = \"{b}\"\n"));
    }
    s
}

fn listener_block(name: &str, bind: SocketAddr, pool: &str) -> String {
    format!("[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\npool = \"{pool}\"\nconnect_timeout = \"1s\"\n\n")
}

struct Setup {
    lb: Ringlb,
    sock: PathBuf,
    listen: SocketAddr,
    _socket_dir: TempDir,
}

fn setup(backends: &[SocketAddr]) -> Setup {
    setup_with_shutdown_timeout(backends, "2s")
}

fn setup_with_shutdown_timeout(backends: &[SocketAddr], shutdown_timeout: &str) -> Setup {
    let dir = TempDir::new("ctl");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let body = listener_block("web", listen, "web") + &pool_block("web", backends, "");
    let config = config_with_control("auto", &sock, &body).replace(
        "shutdown_timeout = \"2s\"",
        &format!("shutdown_timeout = \"{shutdown_timeout}\""),
    );
    let lb = Ringlb::start(&config, listen);
    Setup {
        lb,
        sock,
        listen,
        _socket_dir: dir,
    }
}

#[test]
fn control_socket_is_owner_only_and_answers_status() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[b.addr]);
    let mode = std::fs::metadata(&s.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, v) = ctl_json(&s.sock, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(v["ok"], true);
    assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    assert_eq!(v["listeners"][0]["name"], "web");
    assert_eq!(v["config_generation"], 1);
    let (code, text, _) = ctl_text(&s.sock, &["status"]);
    assert_eq!(code, 0);
    assert!(text.contains("worker 0: ") && text.contains("web"), "{text}");
}

#[test]
fn every_reply_decodes_into_the_protocol_types_and_status_names_the_protocol() {
    use ringlb::protocol::{Reply, Request, PROTOCOL_VERSION};
    let b = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[b.addr]);
    let status = match ctl_request(&s.sock, &Request::Status {}) {
        Reply::Status(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(status.protocol, PROTOCOL_VERSION);
    assert_eq!(status.listeners[0].name, "web");
    let (_, v) = ctl_json(&s.sock, &["status"]);
    assert_eq!(v["protocol"], PROTOCOL_VERSION, "{v}");
    let backends = Request::Backends {
        pool: Some("web".into()),
        limit: None,
        offset: None,
    };
    match ctl_request(&s.sock, &backends) {
        Reply::Backends(r) => assert_eq!(r.pools[0].backends[0].addr, b.addr),
        other => panic!("{other:?}"),
    }
    assert!(matches!(ctl_request(&s.sock, &Request::Stats {}), Reply::Stats(r) if r.listeners[0].name == "web"));
    let route = Request::Route {
        listener: "web".into(),
        client: "127.0.0.1:5000".into(),
        token: None,
    };
    match ctl_request(&s.sock, &route) {
        Reply::Route(r) => assert_eq!(r.chosen, Some(b.addr.to_string())),
        other => panic!("{other:?}"),
    }
    let drain = Request::Drain {
        pool: "web".into(),
        addr: "10.9.9.9:1".into(),
        force: false,
    };
    assert_eq!(
        ctl_request(&s.sock, &drain),
        Reply::Error("pool \"web\" has no backend 10.9.9.9:1".into())
    );
}

#[test]
fn ctl_exit_codes_and_bad_requests_change_nothing() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[b.addr]);
    let (code, _, err) = ctl_text(&s.sock, &["drain", "web", "10.9.9.9:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no backend 10.9.9.9:1"), "{err}");
    let (code, _, err) = ctl_text(&s.sock, &["weight", "web", &b.addr.to_string(), "-5"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("out of range"), "{err}");
    let (code, _, _) = ctl_text(&s.lb.dir.0.join("absent.sock"), &["status"]);
    assert_eq!(code, 2);

    // Raw protocol: garbage, unknown command and an oversized line get error replies.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    for req in [
        "garbage\n",
        "{\"cmd\":\"explode\"}\n",
        "{\"cmd\":\"status\",\"extra\":1}\n",
    ] {
        c.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{req} -> {line}");
        assert!(v["error"].as_str().unwrap().starts_with("bad request"), "{line}");
    }
    let huge = "x".repeat(200_000) + "\n";
    let _ = c.write_all(huge.as_bytes());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("request line longer than 65536 bytes"), "{line}");

    let info = backend_info(&s.sock, "web", b.addr);
    assert_eq!(info["weight"], 1);
    assert_eq!(info["state"], "active");
    assert_eq!(read_tag(s.listen, None).unwrap(), "a");
}

#[test]
fn silent_and_slow_clients_do_not_block_others() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[b.addr]);
    // Clients that connect and send nothing, or half a line.
    let idle: Vec<UnixStream> = (0..10).map(|_| UnixStream::connect(&s.sock).unwrap()).collect();
    let mut half = UnixStream::connect(&s.sock).unwrap();
    half.write_all(b"{\"cmd\":").unwrap();
    let started = Instant::now();
    let (code, _) = ctl_json(&s.sock, &["status"]);
    assert_eq!(code, 0);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(read_tag(s.listen, None).unwrap(), "a", "data plane unaffected");
    // The silent ones are closed after the idle timeout.
    let mut first = idle.into_iter().next().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(first.read(&mut buf).unwrap(), 0, "idle control client closed");
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("stale");
    let sock = dir.0.join("ctl.sock");
    // A stale socket file: bound, then its listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let listen = lb_addr();
    let body = listener_block("web", listen, "web") + &pool_block("web", &[b.addr], "");
    let _lb = Ringlb::start(&config_with_control("auto", &sock, &body), listen);
    assert_eq!(ctl_json(&sock, &["status"]).0, 0);
    // A second ringlb with the same socket fails clearly.
    let listen2 = lb_addr();
    let body2 = listener_block("web", listen2, "web") + &pool_block("web", &[b.addr], "");
    let cfg = dir.file("second.toml", &config_with_control("auto", &sock, &body2));
    let out = ringlb_cmd(&["run", "-c", path_str(&cfg)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by a running ringlb"), "{err}");
    assert_eq!(ctl_json(&sock, &["status"]).0, 0, "first one still answers");
}

#[test]
fn drain_stops_new_connections_and_closes_old_ones_after_drain_timeout() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let s = setup(&[a.addr, b.addr]);
    // Open connections until one lands on a; keep it.
    let mut held = None;
    for _ in 0..100 {
        let mut c = connect_from(s.listen, None).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tag = [0u8; 2];
        c.read_exact(&mut tag).unwrap();
        if &tag == b"a\n" {
            held = Some(c);
            break;
        }
    }
    let mut held = held.expect("a connection to backend a");
    let (code, v) = ctl_json(&s.sock, &["drain", "web", &a.addr.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["remaining"], 1);
    assert_eq!(backend_info(&s.sock, "web", a.addr)["state"], "draining");
    for _ in 0..50 {
        assert_eq!(
            read_tag(s.listen, None).unwrap(),
            "b",
            "no new connection to a drained backend"
        );
    }
    // The held connection still works during the drain...
    held.write_all(b"x").unwrap();
    let mut echo = [0u8; 1];
    held.read_exact(&mut echo).unwrap();
    // ...and is closed once drain_timeout (1s) passes; the count goes to 0.
    let mut buf = [0u8; 8];
    assert_eq!(held.read(&mut buf).unwrap(), 0, "closed after the drain timeout");
    assert!(wait_until(Duration::from_secs(3), || backend_info(
        &s.sock, "web", a.addr
    )["active"]
        == 0));
    // enable brings it back.
    assert_eq!(ctl_json(&s.sock, &["enable", "web", &a.addr.to_string()]).0, 0);
    assert!((0..200).any(|_| read_tag(s.listen, None).unwrap() == "a"));
}

#[test]
fn weight_add_remove_and_disable_change_the_spread() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let s = setup(&[a.addr]);
    assert!((0..20).all(|_| read_tag(s.listen, None).unwrap() == "a"));
    let (code, v) = ctl_json(&s.sock, &["add", "web", &b.addr.to_string(), "--weight", "3"]);
    assert_eq!(code, 0, "{v}");
    let count_b = || (0..400).filter(|_| read_tag(s.listen, None).unwrap() == "b").count();
    let n = count_b();
    assert!((240..=360).contains(&n), "b got {n}/400 at weight 3:1");
    assert_eq!(
        ctl_json(&s.sock, &["add", "web", &b.addr.to_string()]).0,
        1,
        "duplicate add refused"
    );
    assert_eq!(ctl_json(&s.sock, &["weight", "web", &b.addr.to_string(), "1"]).0, 0);
    let n = count_b();
    assert!((150..=250).contains(&n), "b got {n}/400 at weight 1:1");
    assert_eq!(ctl_json(&s.sock, &["disable", "web", &a.addr.to_string()]).0, 0);
    assert_eq!(backend_info(&s.sock, "web", a.addr)["state"], "disabled");
    assert_eq!(count_b(), 400);
    assert_eq!(ctl_json(&s.sock, &["enable", "web", &a.addr.to_string()]).0, 0);
    let (code, _) = ctl_json(&s.sock, &["remove", "web", &b.addr.to_string()]);
    assert_eq!(code, 0);
    assert!(
        wait_until(Duration::from_secs(3), || backend_info(&s.sock, "web", b.addr)
            .is_null()),
        "removed backend gone"
    );
    assert_eq!(count_b(), 0);
}

#[test]
fn reload_rejects_a_bad_config_and_applies_a_good_one() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let mut s = setup(&[a.addr]);
    let good = std::fs::read_to_string(&s.lb.config).unwrap();
    std::fs::write(&s.lb.config, good.replace("table_size = 65537", "table_size = 65536")).unwrap();
    let (code, v) = ctl_json(&s.sock, &["reload"]);
    assert_eq!(code, 1);
    assert!(
        v["error"].as_str().unwrap().contains("table_size: 65536 is not prime"),
        "{v}"
    );
    assert_eq!(
        ctl_json(&s.sock, &["status"]).1["config_generation"],
        1,
        "nothing changed"
    );
    assert_eq!(read_tag(s.listen, None).unwrap(), "a");

    // Add a backend and a second listener.
    let listen2 = lb_addr();
    let new = good.replace(
        &format!("[[pool.backend]]\naddr = \"{}\"\n", a.addr),
        &format!(
            "[[pool.backend]]\naddr = \"{}\"\n[[pool.backend]]\naddr = \"{}\"\n",
            a.addr, b.addr
        ),
    ) + &listener_block("second", listen2, "web");
    std::fs::write(&s.lb.config, new).unwrap();
    let (code, v) = ctl_json(&s.sock, &["reload"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["config_generation"], 2);
    s.lb.wait_listening(listen2);
    assert!((0..200).any(|_| read_tag(listen2, None).unwrap() == "b"));
    // SIGHUP reloads too: back to the original file.
    std::fs::write(&s.lb.config, &good).unwrap();
    s.lb.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || ctl_json(&s.sock, &["status"]).1
        ["config_generation"]
        == 3));
    assert!(
        wait_until(Duration::from_secs(3), || !is_listening(listen2)),
        "removed listener closed"
    );
}

#[test]
fn reload_under_load_drops_nothing() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let s = setup(&[a.addr]);
    let base = std::fs::read_to_string(&s.lb.config).unwrap();
    let load = Load::start(s.listen, 4);
    for i in 0..10 {
        thread::sleep(Duration::from_millis(150));
        let cfg = if i % 2 == 0 {
            base.clone()
                + &format!("[[pool.backend]]\naddr = \"{}\"\n", b.addr)
                + &listener_block("extra", lb_addr(), "web")
        } else {
            base.clone()
        };
        std::fs::write(&s.lb.config, cfg).unwrap();
        let (code, v) = ctl_json(&s.sock, &["reload"]);
        assert_eq!(code, 0, "reload {i}: {v}");
    }
    thread::sleep(Duration::from_millis(200));
    let (n, f, secs) = load.finish();
    println!(
        "reload under load: {n} connections attempted in {secs:.1}s ({:.0}/s), {f} failed, 10 reloads",
        n as f64 / secs
    );
    assert!(
        n as f64 / secs >= 200.0,
        "load too light to mean anything: {n} in {secs:.1}s"
    );
    assert_eq!(f, 0, "{f} of {n} connections failed across reloads");
    assert_eq!(ctl_json(&s.sock, &["status"]).1["config_generation"], 11);
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("metrics");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let metrics = lb_addr();
    let body = listener_block("web", listen, "web") + &pool_block("web", &[a.addr], "");
    let cfg = config_with_control("auto", &sock, &body)
        .replace("[control]\n", &format!("[control]\nmetrics = \"{metrics}\"\n"));
    let mut lb = Ringlb::start(&cfg, listen);
    lb.wait_listening(metrics);
    for _ in 0..5 {
        read_tag(listen, None).unwrap();
    }
    let mut c = std::net::TcpStream::connect(metrics).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert_valid_exposition(body);
    assert!(
        body.contains("ringlb_listener_connections_accepted_total{listener=\"web\"} 5"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "ringlb_backend_connections_total{{pool=\"web\",backend=\"{}\"}} 5",
            a.addr
        )),
        "{body}"
    );
    assert!(
        body.contains("ringlb_backend_connect_duration_seconds_count{listener=\"web\"} 5"),
        "{body}"
    );
    assert!(body.contains("ringlb_workers 2"));
    let mut c = std::net::TcpStream::connect(metrics).unwrap();
    c.write_all(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    // Every reply's Content-Length is its body's (an HTTP client waits for
    // the bytes announced, or drops what follows them).
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let length: usize = head
        .lines()
        // Header names are case-insensitive (hyper writes them in lower case).
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim())
        })
        .expect("a Content-Length header")
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "404 Content-Length against its body {body:?}");
}

/// Checks the text exposition format: every sample line belongs to the family
/// declared just before it by # HELP and # TYPE, names and labels are well
/// formed, values parse as floats, and no family appears twice.
fn assert_valid_exposition(body: &str) {
    let mut seen = std::collections::HashSet::new();
    let mut current: Option<(String, String)> = None;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(seen.insert(name.clone()), "family {name} twice");
            current = Some((name, String::new()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            let cur = current.as_mut().expect("TYPE after HELP");
            assert_eq!(cur.0, name);
            cur.1 = kind.to_string();
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} should end in _total");
            }
        } else {
            let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = name_labels.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
            let (fam, kind) = current.as_ref().expect("sample before HELP");
            let ok = name == fam
                || (kind == "histogram"
                    && [format!("{fam}_bucket"), format!("{fam}_sum"), format!("{fam}_count")]
                        .contains(&name.to_string()));
            assert!(ok, "sample {name} outside its family {fam}");
            if let Some(labels) = name_labels.split_once('{').map(|x| x.1) {
                assert!(labels.ends_with('}'), "{line}");
                for pair in labels.trim_end_matches('}').split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
    }
    assert!(seen.len() > 10);
}

#[test]
fn sigterm_lets_open_connections_finish_then_exits_zero() {
    let a = Backend::start("a", Behaviour::TagEcho);
    // A long shutdown timeout, so a slow machine can't reach it mid-test.
    let mut s = setup_with_shutdown_timeout(&[a.addr], "30s");
    let mut open = connect_from(s.listen, None).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tag = [0u8; 2];
    open.read_exact(&mut tag).unwrap();
    s.lb.signal(libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(2), || !is_listening(s.listen)),
        "stopped accepting"
    );
    assert!(
        connect_from(s.listen, None).is_err() || read_tag(s.listen, None).is_err(),
        "no new connections"
    );
    // The open connection still relays.
    open.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    open.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here");
    assert_eq!(
        s.lb.wait_exit(Duration::from_millis(500)),
        None,
        "waits for the open connection"
    );
    drop(open);
    assert_eq!(s.lb.wait_exit(Duration::from_secs(3)), Some(0));
}

#[test]
fn shutdown_timeout_closes_stragglers_and_second_signal_exits_at_once() {
    let a = Backend::start("a", Behaviour::Stall);
    let mut s = setup(&[a.addr]);
    let mut open = connect_from(s.listen, None).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(wait_until(Duration::from_secs(2), || a.accepted() == 1));
    let started = Instant::now();
    s.lb.signal(libc::SIGTERM);
    let mut buf = [0u8; 4];
    assert_eq!(open.read(&mut buf).unwrap(), 0, "closed at the 2s shutdown timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(s.lb.wait_exit(Duration::from_secs(3)), Some(0));

    let mut s = setup(&[a.addr]);
    let _open = connect_from(s.listen, None).unwrap();
    thread::sleep(Duration::from_millis(200));
    s.lb.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    s.lb.signal(libc::SIGINT);
    assert_eq!(s.lb.wait_exit(Duration::from_secs(1)), Some(0));
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// Issue 17 item 11: after a second SIGTERM the log said "0 connection(s)
/// closed"; it reports the connections the exit closes.
#[test]
fn second_signal_logs_the_connections_it_closes() {
    let a = Backend::start("a", Behaviour::Stall);
    let dir = TempDir::new("ctl");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let body = listener_block("web", listen, "web") + &pool_block("web", &[a.addr], "");
    let config =
        config_with_control("auto", &sock, &body).replace("shutdown_timeout = \"2s\"", "shutdown_timeout = \"30s\"");
    let mut lb = Ringlb::start_logged(&config, listen, &[("RUST_LOG", "info")]);
    let _open: Vec<_> = (0..2).map(|_| connect_from(listen, None).unwrap()).collect();
    assert!(wait_until(Duration::from_secs(3), || a.accepted() == 2));
    lb.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(3), || lb
        .log_text()
        .contains("shutting down")));
    lb.signal(libc::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(2)), Some(0));
    let log = lb.log_text();
    assert!(
        log.contains("ringlb stopped (2 connection(s) closed by the second signal)"),
        "{log}"
    );
}

/// A full control socket: `ringlb ctl` prints the server's "too many control
/// clients" reply (exit 1), not the broken pipe of a request nobody reads.
#[test]
fn ctl_against_a_full_control_socket_prints_the_servers_error() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[b.addr]);
    // Every slot held by a client that was served once and then stays idle.
    let held: Vec<UnixStream> = (0..32)
        .map(|_| {
            let mut c = UnixStream::connect(&s.sock).unwrap();
            c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&c).read_line(&mut line).unwrap();
            assert!(line.contains("\"ok\":true"), "{line}");
            c
        })
        .collect();
    // Whether ringlb closes the refused connection before or after ctl has sent its
    // request is a race (lost when ctl is descheduled between connect and write, as on a
    // busy machine: CPU hogs here make that likely); both must end the same way.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let (code, _, err) = ctl_text(&s.sock, &["status"]);
        *outcomes.entry((code, err)).or_insert(0) += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let expected = (1, "error: too many control clients (max 32); try again\n".to_string());
    assert_eq!(outcomes.keys().collect::<Vec<_>>(), [&expected], "{outcomes:?}");
    drop(held);
}

/// `ringlb ctl ... > /dev/full` says so on stderr and exits 74; it does not panic.
#[test]
fn ctl_output_write_error_exits_74() {
    let b = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[b.addr]);
    for json in [false, true] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut cmd = std::process::Command::new(ringlb_bin());
        cmd.arg("ctl").arg("-s").arg(&s.sock);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.arg("status").stdout(full).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(74), "{stderr}");
        assert!(
            stderr.contains("No space left on device") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// Idle clients on the metrics port (connected, sending nothing) do not keep a
/// scrape out, and each is closed within the request-head timeout.
#[test]
fn idle_metrics_clients_do_not_starve_a_scrape() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("metrics-idle");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let metrics = lb_addr();
    let body = listener_block("web", listen, "web") + &pool_block("web", &[a.addr], "");
    let cfg = config_with_control("auto", &sock, &body)
        .replace("[control]\n", &format!("[control]\nmetrics = \"{metrics}\"\n"));
    let mut lb = Ringlb::start(&cfg, listen);
    lb.wait_listening(metrics);
    let mut idle: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(metrics).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let mut c = std::net::TcpStream::connect(metrics).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    assert!(
        text.starts_with("HTTP/1.1 200 OK"),
        "scrape with 16 idle clients: {text:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // Each idle client is closed within the 1 s head timeout (plus scheduling).
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0)), "an idle client is closed");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
}

/// `ctl route` shows the configured weight (1), not the table's scaled one
/// (1000), and the share of the table each candidate has.
#[test]
fn ctl_route_shows_configured_weights() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let s = setup(&[a.addr, b.addr]);
    let (code, v) = ctl_json(&s.sock, &["route", "web", "127.0.0.1:40000"]);
    assert_eq!(code, 0, "{v}");
    for c in v["candidates"].as_array().unwrap() {
        assert_eq!(c["weight"], 1, "{v}");
        assert_eq!(c["table_share"], 0.5, "{v}");
    }
    let (code, text, err) = ctl_text(&s.sock, &["route", "web", "127.0.0.1:40000"]);
    assert_eq!(code, 0, "{err}");
    assert!(!text.contains("1000"), "{text}");
    let chosen = v["chosen"].as_str().unwrap();
    assert!(
        text.contains(&format!("chosen  {chosen} (weight 1, 50.0% of the table)")),
        "{text}"
    );
    let next = v["candidates"][1]["addr"].as_str().unwrap();
    assert!(
        text.contains(&format!("next    {next} (weight 1, 50.0% of the table)")),
        "{text}"
    );
}

/// Opens connections until `n` of them land on the backend tagged `tag`, and
/// keeps those open (the others are closed).
fn hold_connections_to(listen: SocketAddr, tag: &str, n: usize) -> Vec<std::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..400 {
        let mut c = connect_from(listen, None).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = [0u8; 2];
        c.read_exact(&mut line).unwrap();
        if line == [tag.as_bytes()[0], b'\n'] {
            held.push(c);
            if held.len() == n {
                return held;
            }
        }
    }
    panic!("fewer than {n} connections reached backend {tag}");
}

/// A pool {a, b} with a 60 s drain timeout and three keep-alive connections
/// open on b: the setting in which re-adding b used to take the pool down.
fn readd_setup() -> (Backend, Backend, Setup, Vec<std::net::TcpStream>) {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let dir = TempDir::new("readd");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let body = listener_block("web", listen, "web")
        + &pool_block("web", &[a.addr, b.addr], "").replace("drain_timeout = \"1s\"", "drain_timeout = \"60s\"");
    let lb = Ringlb::start(&config_with_control("auto", &sock, &body), listen);
    let s = Setup {
        lb,
        sock,
        listen,
        _socket_dir: dir,
    };
    let held = hold_connections_to(s.listen, "b", 3);
    (a, b, s, held)
}

/// After b was removed and re-added: b is listed once and active, every new
/// connection is served (some by b), b's open connections still relay, and
/// b's counters went on from where they were.
fn assert_readded(s: &Setup, b: SocketAddr, held: &mut [std::net::TcpStream], total_before: u64) {
    let (code, v) = ctl_json(&s.sock, &["backends", "web"]);
    assert_eq!(code, 0, "{v}");
    let entries: Vec<&serde_json::Value> = v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["addr"] == b.to_string())
        .collect();
    assert_eq!(entries.len(), 1, "b listed once: {v}");
    assert_eq!(entries[0]["state"], "active", "{v}");
    assert_eq!(entries[0]["removing"], false, "{v}");
    let mut to_b = 0;
    for i in 0..100 {
        match read_tag(s.listen, None) {
            Ok(tag) => to_b += usize::from(tag == "b"),
            Err(e) => panic!("new connection {i} after the re-add failed: {e}"),
        }
    }
    assert!(to_b > 0, "the re-added backend takes new connections again");
    for c in held.iter_mut() {
        c.write_all(b"still").unwrap();
        let mut echo = [0u8; 5];
        c.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"still", "b's open connection continues");
    }
    let info = backend_info(&s.sock, "web", b);
    assert_eq!(info["active"], held.len() as u64, "{info}");
    assert!(
        info["total"].as_u64().unwrap() >= total_before + to_b as u64,
        "b's counters continue: {info} (before: {total_before})"
    );
}

#[test]
fn ctl_remove_then_add_of_a_draining_backend_takes_its_entry_over() {
    let (_a, b, s, mut held) = readd_setup();
    let total_before = backend_info(&s.sock, "web", b.addr)["total"].as_u64().unwrap();
    let (code, v) = ctl_json(&s.sock, &["remove", "web", &b.addr.to_string()]);
    assert_eq!(code, 0, "{v}");
    let (code, v) = ctl_json(&s.sock, &["add", "web", &b.addr.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_readded(&s, b.addr, &mut held, total_before);
}

#[test]
fn reload_without_then_with_a_draining_backend_takes_its_entry_over() {
    let (a, b, s, mut held) = readd_setup();
    let total_before = backend_info(&s.sock, "web", b.addr)["total"].as_u64().unwrap();
    let full = std::fs::read_to_string(&s.lb.config).unwrap();
    let without_b = full.replace(&format!("[[pool.backend]]\naddr = \"{}\"\n", b.addr), "");
    assert!(without_b.contains(&a.addr.to_string()) && !without_b.contains(&b.addr.to_string()));
    std::fs::write(&s.lb.config, without_b).unwrap();
    let (code, v) = ctl_json(&s.sock, &["reload"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(backend_info(&s.sock, "web", b.addr)["state"], "draining");
    std::fs::write(&s.lb.config, full).unwrap();
    let (code, v) = ctl_json(&s.sock, &["reload"]);
    assert_eq!(code, 0, "{v}");
    assert_readded(&s, b.addr, &mut held, total_before);
}

#[test]
fn reload_of_an_empty_or_truncated_file_is_rejected_and_the_listener_keeps_serving() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let s = setup(&[a.addr]);
    let good = std::fs::read_to_string(&s.lb.config).unwrap();
    let truncated = good[..good.find("[[listener]]").unwrap()].to_string();
    for text in [String::new(), truncated] {
        std::fs::write(&s.lb.config, &text).unwrap();
        let (code, v) = ctl_json(&s.sock, &["reload"]);
        assert_eq!(code, 1, "{v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("{}: listener: no [[listener]]", s.lb.config.display())),
            "{v}"
        );
        assert_eq!(
            ctl_json(&s.sock, &["status"]).1["config_generation"],
            1,
            "nothing changed"
        );
        assert!(is_listening(s.listen), "the port stays open");
        for _ in 0..10 {
            assert_eq!(read_tag(s.listen, None).unwrap(), "a");
        }
    }
}

/// Runs a ctl command that must be refused: exit 1, an error naming the
/// pool rule, and nothing changed (the pool still serves from `tag`).
fn assert_refused(s: &Setup, args: &[&str], tag: &str) {
    let (code, v) = ctl_json(&s.sock, args);
    assert_eq!(code, 1, "{args:?} must be refused: {v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("pool \"web\": backend: ")
            && (error.contains("could never take a connection") || error.contains("needs at least one"))
            && error.contains("nothing changed"),
        "{args:?}: {v}"
    );
    assert!(error.contains("--force"), "{args:?} names the escape hatch: {v}");
    for _ in 0..5 {
        assert_eq!(read_tag(s.listen, None).unwrap(), tag, "{args:?} changed nothing");
    }
}

#[test]
fn ctl_refuses_to_leave_a_pool_with_no_usable_backend_unless_forced() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let s = setup(&[a.addr, b.addr]);
    let (a_s, b_s) = (a.addr.to_string(), b.addr.to_string());
    // One backend at weight 0 is fine; the last one is not.
    assert_eq!(ctl_json(&s.sock, &["weight", "web", &b_s, "0"]).0, 0);
    assert_refused(&s, &["weight", "web", &a_s, "0"], "a");
    assert_refused(&s, &["drain", "web", &a_s], "a");
    assert_refused(&s, &["disable", "web", &a_s], "a");
    assert_refused(&s, &["remove", "web", &a_s], "a");
    let info = backend_info(&s.sock, "web", a.addr);
    assert_eq!(
        (info["weight"].as_u64(), info["state"].as_str()),
        (Some(1), Some("active")),
        "{info}"
    );
    // Removing b (weight 0) leaves a: allowed. Then a is the last backend.
    assert_eq!(ctl_json(&s.sock, &["remove", "web", &b_s]).0, 0);
    assert_refused(&s, &["remove", "web", &a_s], "a");
    // Adding at weight 0 is fine while a takes connections.
    assert_eq!(ctl_json(&s.sock, &["add", "web", "127.0.0.1:9", "--weight", "0"]).0, 0);
    // --force (JSON "force": true) does it anyway.
    let (code, v) = ctl_json(&s.sock, &["weight", "--force", "web", &a_s, "0"]);
    assert_eq!(code, 0, "{v}");
    assert!(read_tag(s.listen, None).is_err(), "forced: the pool takes nothing");
    // And weight > 0 brings it back without force.
    assert_eq!(ctl_json(&s.sock, &["weight", "web", &a_s, "2"]).0, 0);
    assert_eq!(read_tag(s.listen, None).unwrap(), "a");
    let (code, v) = ctl_json(&s.sock, &["remove", "web", &a_s, "--force"]);
    assert_eq!(code, 0, "{v}");
}

#[test]
fn reload_swaps_and_renames_listeners_on_ringlbs_own_ports() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let dir = TempDir::new("swap");
    let sock = dir.0.join("ctl.sock");
    let (p1, p2) = (lb_addr(), lb_addr());
    let pools = pool_block("pa", &[a.addr], "") + &pool_block("pb", &[b.addr], "");
    let body = |l1: &str, l2: &str| listener_block(l1, p1, "pb") + &listener_block(l2, p2, "pa") + &pools;
    let first = listener_block("la", p1, "pa") + &listener_block("lb", p2, "pb") + &pools;
    let mut lb = Ringlb::start(&config_with_control("auto", &sock, &first), p1);
    lb.wait_listening(p2);
    assert_eq!(read_tag(p1, None).unwrap(), "a");
    assert_eq!(read_tag(p2, None).unwrap(), "b");
    // la moves to p2 and lb to p1; then lb is renamed, keeping p1.
    for (l1, l2) in [("lb", "la"), ("renamed", "la")] {
        std::fs::write(&lb.config, config_with_control("auto", &sock, &body(l1, l2))).unwrap();
        let (code, v) = ctl_json(&sock, &["reload"]);
        assert_eq!(code, 0, "{v}");
        let switched = || read_tag(p1, None).is_ok_and(|t| t == "b") && read_tag(p2, None).is_ok_and(|t| t == "a");
        assert!(wait_until(Duration::from_secs(3), switched), "ports moved");
        for _ in 0..20 {
            assert_eq!(read_tag(p1, None).unwrap(), "b");
            assert_eq!(read_tag(p2, None).unwrap(), "a");
        }
        let status = ctl_json(&sock, &["status"]).1;
        let names: Vec<&str> = status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{status}");
        assert!(names.contains(&l1) && names.contains(&l2), "{status}");
    }
}

/// A reload is held to the pool rules with the operator states it keeps:
/// found by the chaos run (tests/chaos.rs). With a disabled and b active,
/// a file listing only a used to be applied: b was removed, a stayed
/// disabled, and the pool refused every client (`no_backend`).
#[test]
fn reload_that_leaves_only_disabled_or_drained_backends_is_rejected() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let s = setup(&[a.addr, b.addr]);
    let full = std::fs::read_to_string(&s.lb.config).unwrap();
    let only_a = full.replace(&format!("[[pool.backend]]\naddr = \"{}\"\n", b.addr), "");
    for op in ["disable", "drain"] {
        assert_eq!(ctl_json(&s.sock, &[op, "web", &a.addr.to_string()]).0, 0);
        std::fs::write(&s.lb.config, &only_a).unwrap();
        let (code, v) = ctl_json(&s.sock, &["reload"]);
        assert_eq!(
            code, 1,
            "{op}: a reload leaving only {op}d backends must be rejected: {v}"
        );
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("pool \"web\"") && error.contains("drained or disabled"),
            "{op}: {v}"
        );
        assert_eq!(
            ctl_json(&s.sock, &["status"]).1["config_generation"],
            1,
            "nothing changed"
        );
        assert_eq!(backend_info(&s.sock, "web", b.addr)["state"], "active", "b stays");
        for _ in 0..10 {
            assert_eq!(read_tag(s.listen, None).unwrap(), "b");
        }
        // With a back in service the same file is fine.
        assert_eq!(ctl_json(&s.sock, &["enable", "web", &a.addr.to_string()]).0, 0);
        std::fs::write(&s.lb.config, &full).unwrap();
    }
    std::fs::write(&s.lb.config, &only_a).unwrap();
    let (code, v) = ctl_json(&s.sock, &["reload"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(read_tag(s.listen, None).unwrap(), "a");
}
