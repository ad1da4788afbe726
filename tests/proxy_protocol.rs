//! PROXY protocol to backends: the client's address reaches the backend, on both engines.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;

/// One connection through ringlb from `from`: what the backend says the
/// header carried, and the client's own address. Also checks that bytes
/// after the header are relayed as usual.
fn through(listen: SocketAddr, from: Option<IpAddr>) -> (String, SocketAddr) {
    let mut s = connect_from(listen, from).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = s.local_addr().unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    s.write_all(b"after the header\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "after the header\n");
    (line.trim_end().to_string(), me)
}

fn start(variant: &str, bind: SocketAddr, version: &str, backend: SocketAddr) -> Ringlb {
    let (engine, relay) = variant.split_once('+').unwrap_or((variant, "copy"));
    let extra = format!("relay = \"{relay}\"\nproxy_protocol = \"{version}\"\n");
    let reachable = if bind.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], bind.port()))
    } else {
        bind
    };
    Ringlb::start(&tcp_config(engine, bind, &extra, &[(backend, 1)], ""), reachable)
}

fn client_address_reaches_the_backend(variant: &str) {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    for version in ["v1", "v2"] {
        let listen = lb_addr();
        let _lb = start(variant, listen, version, backend.addr);
        for n in 1..=3u8 {
            let (said, me) = through(listen, Some([127, 0, 7, n].into()));
            assert_eq!(said, format!("{version} {me} {listen}"));
        }
    }
}

fn ipv6_clients_are_sent_as_ipv6(variant: &str) {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    for version in ["v1", "v2"] {
        let listen = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), free_port());
        let _lb = start(variant, listen, version, backend.addr);
        let (said, me) = through(listen, Some(Ipv6Addr::LOCALHOST.into()));
        assert_eq!(said, format!("{version} {me} {listen}"));
        assert!(said.contains("[::1]:"), "{said}");
    }
}

fn a_wildcard_listener_sends_the_address_the_client_reached(variant: &str) {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    let port = free_port();
    let _lb = start(variant, SocketAddr::from(([0, 0, 0, 0], port)), "v2", backend.addr);
    for dst in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        let reached = SocketAddr::from((dst, port));
        let (said, me) = through(reached, None);
        assert_eq!(said, format!("v2 {me} {reached}"));
    }
}

macro_rules! on_variants {
    ($($module:ident = $variant:literal),*) => {
        $( mod $module {
            #[test] fn client_address_reaches_the_backend() { super::client_address_reaches_the_backend($variant); }
            #[test] fn ipv6_clients_are_sent_as_ipv6() { super::ipv6_clients_are_sent_as_ipv6($variant); }
            #[test] fn a_wildcard_listener_sends_the_address_the_client_reached() {
                super::a_wildcard_listener_sends_the_address_the_client_reached($variant);
            }
        } )*
    };
}

on_variants!(
    uring = "uring",
    epoll = "epoll",
    uring_auto = "uring+auto",
    epoll_splice = "epoll+splice"
);

/// A backend that requires the header fails plain checks and passes checks
/// that open with the header for ringlb's own connections.
#[test]
fn checks_of_backends_that_require_the_header_send_one() {
    let strict = Backend::start("p", Behaviour::ProxyReport);
    let last_check = |send_proxy: &str| {
        let listen = lb_addr();
        let body = format!(
            "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nproxy_protocol = \"v2\"\n\n\
             [[pool]]\nname = \"web\"\n[pool.health_check]\nkind = \"send_expect\"\nexpect = \"LOCAL\"\n\
             interval = \"100ms\"\ntimeout = \"500ms\"\n{send_proxy}\n[[pool.backend]]\naddr = \"{}\"\n",
            strict.addr
        );
        let lb = start_controlled("epoll", &body, listen);
        let mut last = serde_json::Value::Null;
        wait_until(Duration::from_secs(5), || {
            last = backend_info(&lb.sock, "web", strict.addr)["last_check"].clone();
            !last.is_null()
        });
        last
    };
    let with = last_check("send_proxy = \"v2\"");
    assert_eq!(with["ok"], true, "{with}");
    let without = last_check("");
    assert_eq!(without["ok"], false, "{without}");
}

/// A reload switches the version for new connections.
#[test]
fn reload_changes_the_version() {
    let backend = Backend::start("p", Behaviour::ProxyReport);
    let listen = lb_addr();
    let body = |version: &str| {
        format!(
            "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nproxy_protocol = \"{version}\"\n\n\
             [[pool]]\nname = \"web\"\n[[pool.backend]]\naddr = \"{}\"\n",
            backend.addr
        )
    };
    let lb = start_controlled("uring", &body("v1"), listen);
    let (said, me) = through(listen, None);
    assert_eq!(said, format!("v1 {me} {listen}"));
    std::fs::write(&lb.lb.config, config_with_control("uring", &lb.sock, &body("v2"))).unwrap();
    let (code, reply) = ctl_json(&lb.sock, &["reload"]);
    assert_eq!(code, 0, "{reply}");
    let (said, me) = through(listen, None);
    assert_eq!(said, format!("v2 {me} {listen}"));
    // A bad value is refused and changes nothing.
    std::fs::write(&lb.lb.config, config_with_control("uring", &lb.sock, &body("v9"))).unwrap();
    let (code, reply) = ctl_json(&lb.sock, &["reload"]);
    assert_ne!(code, 0, "{reply}");
    assert!(reply.to_string().contains("proxy_protocol"), "{reply}");
    let (said, me) = through(listen, None);
    assert_eq!(said, format!("v2 {me} {listen}"));
}
