//! `ringlb fleet check`, the per-pool fingerprint and `what-if`, through the real binary on loopback.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;

fn pool_block(backends: &[SocketAddr]) -> String {
    let mut c = "[[pool]]\nname = \"p\"\ntable_size = 65537\n".to_string();
    for b in backends {
        c.push_str(&format!("[[pool.backend]]\naddr = \"{b}\"\n"));
    }
    c
}

fn fleet_check(endpoints: &[&str]) -> (i32, String) {
    let mut args = vec!["fleet", "check"];
    args.extend_from_slice(endpoints);
    let out = ringlb_cmd_within(&args, Duration::from_secs(20));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn fleet_check_agrees_then_names_the_diverged_instance() {
    let backends: Vec<Backend> = (0..3)
        .map(|i| Backend::start(&format!("b{i}"), Behaviour::TagEcho))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (la, lb_) = (lb_addr(), lb_addr());
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listener = |l: SocketAddr| format!("[[listener]]\nname = \"t\"\nbind = \"{l}\"\npool = \"p\"\n\n");
    let a = start_controlled("auto", &(listener(la) + &pool_block(&addrs)), la);
    // The same backends listed in another order: the table routes alike and
    // the fingerprint agrees (the raw table digest does not).
    let reversed: Vec<SocketAddr> = addrs.iter().rev().copied().collect();
    let dir_b = TempDir::new("fleet-b");
    let sock_b = dir_b.0.join("ctl.sock");
    let config_b = config_with_control("auto", &sock_b, &(listener(lb_) + &pool_block(&reversed)))
        .replace("[control]\n", &format!("[control]\nmetrics = \"{metrics}\"\n"));
    let _lb_b = Ringlb::start(&config_b, lb_);
    struct B {
        sock: std::path::PathBuf,
    }
    let b = B { sock: sock_b };
    let (sa, sb) = (path_str(&a.sock).to_string(), path_str(&b.sock).to_string());
    let m = metrics.to_string();

    let status = |s: &std::path::Path| ctl_json(s, &["status"]).1["pools"][0].clone();
    let (pa, pb) = (status(&a.sock), status(&b.sock));
    assert_eq!(pa["fingerprint"], pb["fingerprint"], "{pa} vs {pb}");
    assert_ne!(
        pa["table_digest"], pb["table_digest"],
        "listing order shows in the raw digest"
    );
    assert_eq!(pa["usable_backends"], 3);
    let (_, text, _) = ctl_text(&a.sock, &["status"]);
    assert!(
        text.contains(&format!("pool p: fingerprint {}", pa["fingerprint"].as_str().unwrap())),
        "{text}"
    );
    // The raw digest too, so two instances' tables compare at a glance.
    let digest_a = pa["table_digest"].as_str().unwrap();
    assert!(
        text.contains(&format!("(generation {}, digest {digest_a})", pa["table_generation"])),
        "{text}"
    );
    let (_, backends_json) = ctl_json(&b.sock, &["backends"]);
    assert_eq!(backends_json["pools"][0]["fingerprint"], pb["fingerprint"]);
    assert_eq!(backends_json["pools"][0]["table_digest"], pb["table_digest"]);
    let (_, text, _) = ctl_text(&b.sock, &["backends"]);
    let digest_b = pb["table_digest"].as_str().unwrap();
    assert!(text.contains(&format!("digest {digest_b}, fingerprint ")), "{text}");
    let page = http_get(metrics, "/metrics");
    assert!(
        page.contains(&format!(
            "ringlb_pool_fingerprint_info{{pool=\"p\",fingerprint=\"{}\",table_digest=\"{}\"}} 1",
            pb["fingerprint"].as_str().unwrap(),
            pb["table_digest"].as_str().unwrap()
        )),
        "{page}"
    );

    let (code, out) = fleet_check(&[&sa, &sb, &m]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("agree: 3 instance(s)"), "{out}");

    // Diverge B: it sees a backend out of service.
    let (code, v) = ctl_json(&b.sock, &["drain", "p", &addrs[1].to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_ne!(status(&b.sock)["fingerprint"], pa["fingerprint"]);
    let (code, out) = fleet_check(&[&sa, &sb, &m]);
    assert_eq!(code, 1, "{out}");
    let expect = format!(
        "pool \"p\": backend {} is not usable (draining) here, usable (active) on the first",
        addrs[1]
    );
    assert!(out.contains(&format!("{sb}: {expect}")), "{out}");
    assert!(out.contains(&format!("{m}: {expect}")), "metrics endpoint: {out}");
    // The same as JSON.
    let (code, out) = fleet_check(&[&sa, &sb, "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["agree"], false, "{v}");
    assert_eq!(v["instances"], serde_json::json!([sa, sb]), "{v}");
    assert_eq!(v["pools"][0]["pool"], "p", "{v}");
    assert_eq!(v["pools"][0]["fingerprint"], pa["fingerprint"], "{v}");
    assert_eq!(v["differences"][0]["endpoint"], sb.as_str(), "{v}");
    assert_eq!(v["differences"][0]["first_difference"], expect, "{v}");

    // Back in line, then a weight differs.
    assert_eq!(ctl_json(&b.sock, &["enable", "p", &addrs[1].to_string()]).0, 0);
    assert_eq!(fleet_check(&[&sa, &sb]).0, 0);
    assert_eq!(ctl_json(&a.sock, &["weight", "p", &addrs[2].to_string(), "3"]).0, 0);
    let (code, out) = fleet_check(&[&sa, &sb, &m]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("backend {} has weight 1 here, 3 on the first", addrs[2])),
        "{out}"
    );
    let (code, out) = fleet_check(&[&sa, "/nonexistent/ctl.sock"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("/nonexistent/ctl.sock"), "{out}");
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// UDP backends answering `PAYLOAD|tag`.
fn udp_backend(tag: &'static str) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut reply = buf[..n].to_vec();
            reply.extend_from_slice(format!("|{tag}").as_bytes());
            let _ = s.send_to(&reply, from);
        }
    });
    addr
}

#[test]
fn what_if_reports_moves_without_changing_anything_live_and_offline() {
    let tags = ["u0", "u1", "u2", "u3"];
    let addrs: Vec<SocketAddr> = tags.iter().map(|t| udp_backend(t)).collect();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // A TCP listener on the pool too, so the start can be waited for.
    let tcp = lb_addr();
    let body = format!(
        "[[listener]]\nname = \"g\"\nbind = \"{listen}\"\nprotocol = \"udp\"\npool = \"p\"\n\n[[listener]]\nname = \"t\"\nbind = \"{tcp}\"\npool = \"p\"\n\n{}\n[pool.health_check]\nkind = \"none\"\n",
        pool_block(&addrs)
    );
    let dir = TempDir::new("whatif");
    let sock = dir.0.join("ctl.sock");
    let config = config_with_control("auto", &sock, &body);
    let cfg_path = dir.file("old.toml", &config);
    let _lb = Ringlb::start(&config, tcp);

    // 40 flows; count those on backend 1.
    let mut clients = Vec::new();
    let mut on_u1 = 0;
    for i in 0..40 {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.send_to(format!("hi{i}").as_bytes(), listen).unwrap();
        let mut buf = [0u8; 128];
        let (n, _) = c.recv_from(&mut buf).expect("udp reply");
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        on_u1 += usize::from(reply.ends_with("|u1"));
        clients.push(c);
    }
    let before = ctl_json(&sock, &["backends"]).1;

    let (code, v) = ctl_json(&sock, &["what-if", "p", "remove", &addrs[1].to_string()]);
    assert_eq!(code, 0, "{v}");
    let moved = v["key_space"][0]["moved_fraction"].as_f64().unwrap();
    assert!((moved - 0.25).abs() < 0.02, "{v}");
    assert_eq!(v["udp_flows_repick"], on_u1 as u64, "{v}");
    // What moves comes from the removed backend, but for Maglev's small
    // extra disruption between the others (a few hundredths of a percent).
    let from_removed: f64 = v["key_space"][0]["moves"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["from"] == addrs[1].to_string())
        .map(|m| m["fraction"].as_f64().unwrap())
        .sum();
    assert!(from_removed / moved > 0.99, "{v}");

    let new_backend = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (code, v) = ctl_json(
        &sock,
        &["what-if", "p", "add", &new_backend.to_string(), "--weight", "1"],
    );
    assert_eq!(code, 0, "{v}");
    let add_moved = v["key_space"][0]["moved_fraction"].as_f64().unwrap();
    assert!((add_moved - 0.2).abs() < 0.02, "{v}");
    assert_eq!(v["udp_flows_repick"], 0);
    let (code, text, _) = ctl_text(&sock, &["what-if", "p", "weight", &addrs[0].to_string(), "2"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("what-if (nothing changed): weight"), "{text}");
    assert!(
        text.contains("all clients: ") && text.contains("of the key space moves"),
        "{text}"
    );

    // Refused like the commands they preview.
    let (code, v) = ctl_json(&sock, &["what-if", "p", "remove", "127.0.0.1:1"]);
    assert_eq!(
        (code, v["error"].as_str()),
        (1, Some("pool \"p\" has no backend 127.0.0.1:1"))
    );
    let (code, v) = ctl_json(&sock, &["what-if", "p", "add", "127.0.0.1:2", "--weight", "2000000"]);
    assert_eq!(code, 1, "{v}");
    assert!(v["error"].as_str().unwrap().contains("weight"), "{v}");
    let (code, _) = ctl_json(&sock, &["what-if", "nope", "remove", &addrs[1].to_string()]);
    assert_eq!(code, 1);

    // Nothing changed.
    let after = ctl_json(&sock, &["backends"]).1;
    assert_eq!(
        before["pools"][0]["table_generation"],
        after["pools"][0]["table_generation"]
    );
    assert_eq!(before["pools"][0]["fingerprint"], after["pools"][0]["fingerprint"]);

    // Offline: the same change as two files gives the same figure.
    let new_cfg = dir.file(
        "new.toml",
        &config.replace(&format!("[[pool.backend]]\naddr = \"{}\"\n", addrs[1]), ""),
    );
    let out = ringlb_cmd(&["what-if", "-c", path_str(&cfg_path), "-c", path_str(&new_cfg), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["pools"][0]["key_space"][0]["moved_fraction"].as_f64().unwrap(),
        moved,
        "{v}"
    );
    let out = ringlb_cmd(&["what-if", "-c", path_str(&cfg_path), "-c", path_str(&new_cfg)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{:<24} -> ", addrs[1].to_string())), "{text}");
    // A bad file is named, and one file is a usage error.
    let bad = dir.file("bad.toml", "[[listener]]\nname = 1\n");
    let out = ringlb_cmd(&["what-if", "-c", path_str(&cfg_path), "-c", path_str(&bad)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));
    let out = ringlb_cmd(&["what-if", "-c", path_str(&cfg_path)]);
    assert_eq!(out.status.code(), Some(64));
    drop(clients);
}
