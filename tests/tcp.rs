//! TCP data plane through the real binary, on both io engines.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `variant` is an engine, optionally with a relay mode: `uring`, `epoll+splice`, ...
fn start_lb(variant: &str, extra_listener: &str, backends: &[(SocketAddr, u32)]) -> (Ringlb, SocketAddr) {
    let (engine, relay) = variant.split_once('+').unwrap_or((variant, "copy"));
    let listen = lb_addr();
    let extra = format!("relay = \"{relay}\"\n{extra_listener}");
    let lb = Ringlb::start(&tcp_config(engine, listen, &extra, backends, ""), listen);
    (lb, listen)
}

fn transfer_64mib_intact_both_directions(engine: &str) {
    let echo = Backend::start("echo", Behaviour::Echo);
    let (_lb, listen) = start_lb(engine, "", &[(echo.addr, 1)]);
    const TOTAL: usize = 64 << 20;
    let mut client = connect_from(listen, None).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = client.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut state = 0x1234_5678_u64;
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            for b in chunk.iter_mut() {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (state >> 56) as u8;
            }
            writer.write_all(&chunk).unwrap();
            hasher.update(&chunk);
            sent += chunk.len();
        }
        writer.shutdown(Shutdown::Write).unwrap();
        hasher.digest()
    });
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = client.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n;
    }
    let sent_digest = sender.join().unwrap();
    assert_eq!(got, TOTAL, "bytes echoed back");
    assert_eq!(hasher.digest(), sent_digest, "checksum of the echoed stream");
}

fn five_hundred_concurrent_connections_all_served(engine: &str) {
    let echo = Backend::start("echo", Behaviour::Echo);
    let (_lb, listen) = start_lb(engine, "", &[(echo.addr, 1)]);
    let mut conns = Vec::new();
    for i in 0..500 {
        let mut s = connect_from(listen, None).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(format!("hello {i}\n").as_bytes()).unwrap();
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let want = format!("hello {i}\n");
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(got, want.as_bytes());
    }
    assert_eq!(echo.accepted(), 500);
}

fn weighted_spread_within_ten_percent(engine: &str) {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect();
    let weights = [1u32, 1, 2];
    let pairs: Vec<_> = backends.iter().zip(weights).map(|(b, w)| (b.addr, w)).collect();
    let (_lb, listen) = start_lb(engine, "hash_key = \"src_ip_port\"", &pairs);
    // 6,000 connections: the 10% band is then ~4.5 standard deviations wide.
    const N: usize = 6000;
    let counts: HashMap<String, usize> = (0..4)
        .map(|_| thread::spawn(move || (0..N / 4).map(|_| read_tag(listen, None).unwrap()).collect::<Vec<_>>()))
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .fold(HashMap::new(), |mut m, t| {
            *m.entry(t).or_default() += 1;
            m
        });
    for (b, w) in backends.iter().zip(weights) {
        let share = *counts.get(&b.tag).unwrap_or(&0) as f64 / N as f64;
        let want = w as f64 / 4.0;
        assert!(
            (share - want).abs() <= 0.10 * want,
            "backend {} got {share:.3}, want {want:.3} ±10%: {counts:?}",
            b.tag
        );
    }
}

fn src_ip_hash_is_sticky(engine: &str) {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start(t, Behaviour::TagEcho))
        .collect();
    let pairs: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let (_lb, listen) = start_lb(engine, "hash_key = \"src_ip\"", &pairs);
    let mut seen_backends = std::collections::HashSet::new();
    for host in 1..=12u8 {
        let ip: IpAddr = [127, 0, 3, host].into();
        let first = read_tag(listen, Some(ip)).unwrap();
        for _ in 0..15 {
            assert_eq!(read_tag(listen, Some(ip)).unwrap(), first, "client {ip} moved");
        }
        seen_backends.insert(first);
    }
    assert!(
        seen_backends.len() >= 2,
        "12 client addresses all hashed to {seen_backends:?}"
    );
}

fn refusing_backend_is_skipped(engine: &str) {
    let good = Backend::start("good", Behaviour::TagEcho);
    let (_refusing_guard, refusing) = refusing_addr();
    let (_lb, listen) = start_lb(engine, "", &[(good.addr, 1), (refusing, 3)]);
    for i in 0..200 {
        assert_eq!(
            read_tag(listen, None).unwrap_or_else(|e| panic!("connection {i}: {e}")),
            "good"
        );
    }
}

fn no_backend_fails_fast(engine: &str) {
    let (_refusing_guard, refusing) = refusing_addr();
    let (_lb, listen) = start_lb(engine, "connect_attempts = 2", &[(refusing, 1)]);
    let started = Instant::now();
    let err = read_tag(listen, None).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "client waited {:?}: {err}",
        started.elapsed()
    );
}

fn half_close_client_first(engine: &str) {
    let echo = Backend::start("echo", Behaviour::Echo);
    let (_lb, listen) = start_lb(engine, "", &[(echo.addr, 1)]);
    let mut s = connect_from(listen, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"request body").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    // The echo backend only finishes after it sees our EOF, so reading the
    // echo and then EOF proves the FIN went through and the reverse direction
    // kept flowing after it.
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request body");
}

fn half_close_backend_first(engine: &str) {
    // A backend that sends a greeting and closes its write side at once, then
    // keeps reading and reports the byte count on a side channel.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"bye").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    let (_lb, listen) = start_lb(engine, "", &[(addr, 1)]);
    let mut s = connect_from(listen, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"bye", "backend's data then EOF reach the client");
    s.write_all(b"still talking").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"still talking");
}

fn idle_timeout_closes_client_with_eof(engine: &str) {
    let stall = Backend::start("stall", Behaviour::Stall);
    let (_lb, listen) = start_lb(engine, "idle_timeout = \"400ms\"", &[(stall.addr, 1)]);
    let mut s = connect_from(listen, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"anyone?").unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).expect("EOF, not a read timeout");
    let waited = started.elapsed();
    assert_eq!(n, 0, "EOF");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

/// A backend that answers and closes at once (the reply and its FIN arrive
/// together): every client gets the whole reply and then EOF promptly, not
/// after the idle timeout.
fn reply_then_close_reaches_the_client_with_eof(engine: &str) {
    let answer = Backend::start("answer", Behaviour::Reply("+OK done\r\n"));
    let (_lb, listen) = start_lb(engine, "idle_timeout = \"30s\"", &[(answer.addr, 1)]);
    for i in 0..50 {
        let mut s = connect_from(listen, None).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET\r\n").unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: no EOF after {:?}: {e}", started.elapsed()));
        assert_eq!(got, b"+OK done\r\n", "connection {i}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "connection {i}: EOF after {:?}",
            started.elapsed()
        );
    }
}

/// A backend that aborts its connection (RST) is passed on as an abort: the
/// client sees a reset, not a clean end of stream it could take for a
/// complete answer.
fn a_backend_reset_reaches_the_client_as_a_reset(engine: &str) {
    let reset = Backend::start("reset", Behaviour::ResetAfterRead);
    let (_lb, listen) = start_lb(engine, "", &[(reset.addr, 1)]);
    for i in 0..20 {
        let outcome = connect_from(listen, None).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let _ = s.write_all(b"hello");
            let mut buf = [0u8; 16];
            s.read(&mut buf)
        });
        match outcome {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("connection {i}: expected a reset, got {other:?}"),
        }
    }
}

macro_rules! on_variants {
    ($($module:ident = $variant:literal),* ; $names:tt) => {
        $( on_variants!(@one $module $variant $names); )*
    };
    (@one $module:ident $variant:literal [$($name:ident),* $(,)?]) => {
        mod $module {
            $( #[test] fn $name() { super::$name($variant); } )*
        }
    };
}

on_variants!(uring = "uring", epoll = "epoll"; [
    transfer_64mib_intact_both_directions,
    five_hundred_concurrent_connections_all_served,
    weighted_spread_within_ten_percent,
    src_ip_hash_is_sticky,
    refusing_backend_is_skipped,
    no_backend_fails_fast,
    half_close_client_first,
    half_close_backend_first,
    idle_timeout_closes_client_with_eof,
    reply_then_close_reaches_the_client_with_eof,
    a_backend_reset_reaches_the_client_as_a_reset,
]);

// The splice relay and auto (copy, then splice on bulk) on both engines.
on_variants!(uring_splice = "uring+splice", epoll_splice = "epoll+splice", uring_auto = "uring+auto", epoll_auto = "epoll+auto"; [
    transfer_64mib_intact_both_directions,
    five_hundred_concurrent_connections_all_served,
    half_close_client_first,
    half_close_backend_first,
    idle_timeout_closes_client_with_eof,
    reply_then_close_reaches_the_client_with_eof,
    a_backend_reset_reaches_the_client_as_a_reset,
]);
