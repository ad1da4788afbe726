//! PROXY protocol header building: the per-connection cost when a listener sends one.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use ringlb::config::ProxyProtocol;
use ringlb::proxy::proxy_protocol::header;

fn bench(c: &mut Criterion) {
    let cases: [(&str, SocketAddr, SocketAddr); 2] = [
        (
            "ipv4",
            "192.0.2.7:56324".parse().unwrap(),
            "198.51.100.1:5432".parse().unwrap(),
        ),
        (
            "ipv6",
            "[2001:db8:1:2:3:4:5:6]:56324".parse().unwrap(),
            "[2001:db8::1]:5432".parse().unwrap(),
        ),
    ];
    for (family, client, local) in cases {
        for (name, version) in [("v1", ProxyProtocol::V1), ("v2", ProxyProtocol::V2)] {
            c.bench_function(&format!("proxy_header/{name}/{family}"), |b| {
                b.iter(|| header(black_box(version), black_box(client), black_box(local)).map(|h| h.bytes().len()))
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
