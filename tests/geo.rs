//! Geographic weighting through the real binary: client regions by CIDR,
//! per-region tables, spill-over and recovery, `ctl route`.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

type Lb = Controlled;

const REGIONS_CSV: &str = "# test regions\nnetwork,region\n127.1.0.0/16,eu\n127.2.0.0/16,us\n127.1.5.0/24,us  # nested: longest prefix wins\n::1/128,us\n";

fn start(backends: &[(SocketAddr, &str)], pool_extra: &str, listen: SocketAddr) -> Lb {
    let dir = TempDir::new("geo");
    dir.file("regions.csv", REGIONS_CSV);
    let mut body = format!(
        "[geo]\nprefixes_file = \"{}\"\n\n[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nhash_key = \"src_ip_port\"\nconnect_timeout = \"500ms\"\nconnect_attempts = 4\n\n[[pool]]\nname = \"web\"\n{pool_extra}\n[pool.geo]\neu = {{ eu = 1000, us = 1 }}\nus = {{ us = 1000, eu = 1 }}\ndefault = {{ eu = 1, us = 1 }}\n",
        dir.0.join("regions.csv").display()
    );
    for (b, region) in backends {
        body.push_str(&format!("[[pool.backend]]\naddr = \"{b}\"\nregion = \"{region}\"\n"));
    }
    start_controlled("auto", &body, listen)
}

fn four_backends() -> Vec<Backend> {
    ["eu-1", "eu-2", "us-1", "us-2"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect()
}

fn pairs(bs: &[Backend]) -> Vec<(SocketAddr, &'static str)> {
    bs.iter()
        .map(|b| (b.addr, if b.tag.starts_with("eu") { "eu" } else { "us" }))
        .collect()
}

/// Region share of `n` connections from distinct addresses in 127.`net`.x.y.
fn region_share(lb: &Lb, net: u8, n: u32) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in 0..n {
        let ip: IpAddr = [127, net, (i / 200) as u8 + 10, (i % 200) as u8 + 1].into();
        let tag = read_tag(lb.listen, Some(ip)).unwrap_or_else(|e| panic!("client {ip}: {e}"));
        *m.entry(tag[..2].to_string()).or_default() += 1;
    }
    m
}

#[test]
fn clients_reach_their_own_region_and_unknown_sources_use_default() {
    let bs = four_backends();
    let lb = start(&pairs(&bs), "", lb_addr());
    let eu = region_share(&lb, 1, 400);
    assert!(eu.get("eu").copied().unwrap_or(0) >= 396, "eu clients: {eu:?}");
    let us = region_share(&lb, 2, 400);
    assert!(us.get("us").copied().unwrap_or(0) >= 396, "us clients: {us:?}");
    // 127.3.x.y matches no prefix: default row, 1:1.
    let other = region_share(&lb, 3, 400);
    let e = other.get("eu").copied().unwrap_or(0);
    assert!((140..=260).contains(&e), "default clients: {other:?}");
    // Nested prefix: 127.1.5.0/24 is us inside eu's /16.
    for host in 1..20u8 {
        let tag = read_tag(lb.listen, Some([127, 1, 5, host].into())).unwrap();
        assert!(tag.starts_with("us"), "127.1.5.{host} went to {tag}");
    }
}

#[test]
fn draining_half_of_eu_moves_its_share_to_us_and_losing_all_of_eu_moves_everything() {
    let bs = four_backends();
    let check = "[pool.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 1\nrise = 1\n[pool.outlier]\nconsecutive_failures = 0\n";
    let lb = start(&pairs(&bs), &format!("panic_threshold = 0\n{check}"), lb_addr());
    assert_eq!(ctl_json(&lb.sock, &["drain", "web", &bs[1].addr.to_string()]).0, 0);
    let m = region_share(&lb, 1, 400);
    let us = m.get("us").copied().unwrap_or(0);
    // eu keeps half its share (one of two equal backends left): ~50% to us.
    assert!((140..=260).contains(&us), "after draining eu-2: {m:?}");
    assert_eq!(ctl_json(&lb.sock, &["enable", "web", &bs[1].addr.to_string()]).0, 0);

    // Kill every eu backend: eu clients all go to us, with no client-visible error.
    let eu_addrs = [bs[0].addr, bs[1].addr];
    let mut bs = bs.into_iter();
    drop((bs.next(), bs.next()));
    let us_backends: Vec<Backend> = bs.collect();
    assert!(wait_until(Duration::from_secs(2), || eu_addrs
        .iter()
        .all(|a| !is_listening(*a))));
    let m = region_share(&lb, 1, 300);
    assert_eq!(m.get("us").copied().unwrap_or(0), 300, "{m:?}");
    // Recovery: new eu connections come back to eu.
    let back: Vec<Backend> = eu_addrs
        .iter()
        .zip(["eu-1", "eu-2"])
        .map(|(a, t)| Backend::start_on(*a, t, Behaviour::TagEcho))
        .collect();
    // Up by their checks and back in the published table: health changes
    // are rebuilt at the next control tick (at most 100 ms after the state).
    let in_table = |a: SocketAddr| {
        let b = backend_info(&lb.sock, "web", a);
        b["state"] == "active" && b["effective_weight"].as_u64().unwrap_or(0) > 0
    };
    assert!(wait_until(Duration::from_secs(3), || in_table(eu_addrs[0])
        && in_table(eu_addrs[1])));
    let m = region_share(&lb, 1, 300);
    assert!(m.get("eu").copied().unwrap_or(0) >= 297, "after recovery: {m:?}");
    drop((us_backends, back));
}

#[test]
fn ipv6_clients_are_mapped_too() {
    let bs = four_backends();
    let listen: SocketAddr = format!("[::1]:{}", free_port()).parse().unwrap();
    let lb = start(&pairs(&bs), "", listen);
    // us clients: us = 1000, eu = 1, so ~0.1% may land in eu by design.
    let us = (0..200)
        .filter(|_| read_tag(listen, None).unwrap().starts_with("us"))
        .count();
    assert!(us >= 196, "::1 is in us: {us}/200 went to us");
    let (code, v) = ctl_json(&lb.sock, &["route", "web", "[::1]:5555"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["region"], "us");
}

#[test]
fn ctl_route_explains_a_decision() {
    let bs = four_backends();
    let lb = start(&pairs(&bs), "", lb_addr());
    let (code, v) = ctl_json(&lb.sock, &["route", "web", "127.1.2.3:40000"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["region"], "eu");
    assert!(v["table"].as_str().unwrap().contains("client region \"eu\""), "{v}");
    let chosen = v["chosen"].as_str().unwrap().to_string();
    assert!(v["candidates"].as_array().unwrap().len() >= 3);
    // The explanation matches what a real connection from there does.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.bind(&"127.1.2.3:40000".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&lb.listen.into()).unwrap();
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line).unwrap();
    let tag = line.trim();
    let expected = bs.iter().find(|b| b.addr.to_string() == chosen).unwrap();
    assert_eq!(tag, expected.tag, "route said {chosen}");
    let (code, text, _) = ctl_text(&lb.sock, &["route", "web", "127.1.2.3:40000"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("region  eu") && text.contains("chosen  ") && text.contains("next    "),
        "{text}"
    );
    assert_eq!(ctl_json(&lb.sock, &["route", "nope", "127.0.0.1"]).0, 1);
    assert_eq!(ctl_json(&lb.sock, &["route", "web", "not-an-ip"]).0, 1);
}

#[test]
fn prefix_loader_rejects_bad_lines_with_file_and_line() {
    let dir = TempDir::new("geocheck");
    dir.file(
        "regions.csv",
        "# ok\n10.0.0.0/8,eu\n10.0.0.300/8,us\n10.1.0.0/8,us\n192.168.0.0/16\n",
    );
    let cfg = dir.file(
        "c.toml",
        "[geo]\nprefixes_file = \"regions.csv\"\n[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:2\"\n",
    );
    let out = ringlb_cmd(&["check", "-c", path_str(&cfg)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("regions.csv:3:"), "{err}");
    assert!(err.contains("regions.csv:4:") && err.contains("host bits"), "{err}");
    assert!(err.contains("regions.csv:5:"), "{err}");
}

/// Prefixes files that must be refused: a character device that never ends,
/// a FIFO nobody writes to, and a regular file over the size limit (sparse,
/// so the test writes nothing). Returns (what, path, text the error must hold).
fn hostile_prefix_files(dir: &TempDir) -> Vec<(&'static str, std::path::PathBuf, &'static str)> {
    let big = dir.0.join("big.csv");
    std::fs::File::create(&big).unwrap().set_len((64 << 20) + 1).unwrap();
    let fifo = dir.0.join("regions.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    vec![
        ("oversized file", big, "larger than the 64 MiB limit"),
        ("fifo", fifo, "not a regular file"),
        ("/dev/zero", "/dev/zero".into(), "not a regular file"),
    ]
}

fn geo_config(
    listen: SocketAddr,
    backend: SocketAddr,
    prefixes_file: &std::path::Path,
    sock: Option<&std::path::Path>,
) -> String {
    let control = sock.map_or(String::new(), |s| {
        format!("[control]\nsocket = \"{}\"\n\n", s.display())
    });
    format!(
        "[runtime]\nworkers = 1\nshutdown_timeout = \"1s\"\n\n{control}[geo]\nprefixes_file = \"{}\"\n\n[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\n[[pool.backend]]\naddr = \"{backend}\"\n",
        prefixes_file.display()
    )
}

#[test]
fn check_and_run_refuse_a_prefixes_file_that_is_not_a_bounded_regular_file() {
    let dir = TempDir::new("geo-hostile");
    for (what, path, problem) in hostile_prefix_files(&dir) {
        let cfg = dir.file(
            "c.toml",
            &geo_config(lb_addr(), "127.0.0.1:9".parse().unwrap(), &path, None),
        );
        for cmd in ["check", "run"] {
            let started = std::time::Instant::now();
            let out = ringlb_cmd_within(&[cmd, "-c", path_str(&cfg)], Duration::from_secs(10));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} with {what}: {stderr}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{cmd} with {what} fails fast"
            );
            let expected = format!("c.toml: geo.prefixes_file: {}: {problem}", path.display());
            assert!(stderr.contains(&expected), "{cmd} with {what}: {stderr}");
        }
    }
}

/// Sends one request on the control socket and waits at most `limit` for the reply.
fn ctl_within(sock: &std::path::Path, request: &str, limit: Duration) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(limit)).unwrap();
    c.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(c)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no reply to {request} within {limit:?}: {e}"));
    serde_json::from_str(&line).unwrap()
}

#[test]
fn reload_with_a_hostile_prefixes_file_is_refused_and_the_control_socket_keeps_answering() {
    let backend = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("geo-reload");
    let good = dir.file("regions.csv", REGIONS_CSV);
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let lb = Ringlb::start(&geo_config(listen, backend.addr, &good, Some(&sock)), listen);
    for (what, path, problem) in hostile_prefix_files(&dir) {
        std::fs::write(&lb.config, geo_config(listen, backend.addr, &path, Some(&sock))).unwrap();
        let started = std::time::Instant::now();
        let v = ctl_within(&sock, r#"{"cmd":"reload"}"#, Duration::from_secs(2));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: reply took {:?}",
            started.elapsed()
        );
        assert_eq!(v["ok"], false, "{what}: {v}");
        let expected = format!("geo.prefixes_file: {}: {problem}", path.display());
        assert!(v["error"].as_str().unwrap().contains(&expected), "{what}: {v}");
        let status = ctl_within(&sock, r#"{"cmd":"status"}"#, Duration::from_secs(2));
        assert_eq!(status["config_generation"], 1, "{what}: running config kept");
        assert_eq!(read_tag(listen, None).unwrap(), "a", "{what}: still serving");
    }
}
