//! The pre-read parsers: the per-connection cost of `accept_proxy` and SNI routing.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ringlb::config::ProxyProtocol;
use ringlb::proxy::client_hello::server_name;
use ringlb::proxy::proxy_accept::{parse, Accept};
use ringlb::proxy::proxy_protocol::header;

/// A ClientHello shaped like a current browser's: SNI after a few
/// extensions, 512 bytes of padding (key shares are about that size).
fn client_hello() -> Vec<u8> {
    let sni = b"db1.example.com";
    let mut exts = Vec::new();
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    exts.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    let mut list = vec![0u8];
    list.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    list.extend_from_slice(sni);
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&list);
    exts.extend_from_slice(&[0, 0]);
    exts.extend_from_slice(&(body.len() as u16).to_be_bytes());
    exts.extend_from_slice(&body);
    exts.extend_from_slice(&[0x00, 0x15, 0x02, 0x00]);
    exts.resize(exts.len() + 512, 0);
    let mut ch = vec![3, 3];
    ch.extend_from_slice(&[7; 32]);
    ch.push(32);
    ch.extend_from_slice(&[9; 32]);
    ch.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 1, 0]);
    ch.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    ch.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(ch.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&ch);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn bench(c: &mut Criterion) {
    let v1 = header(
        ProxyProtocol::V1,
        "[2001:db8:1:2:3:4:5:6]:56324".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    )
    .unwrap();
    let v2 = header(
        ProxyProtocol::V2,
        "192.0.2.7:56324".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    )
    .unwrap();
    c.bench_function("proxy_accept/v1/ipv6", |b| {
        b.iter(|| parse(black_box(v1.bytes()), Accept::Any))
    });
    c.bench_function("proxy_accept/v2/ipv4", |b| {
        b.iter(|| parse(black_box(v2.bytes()), Accept::Any))
    });
    let hello = client_hello();
    c.bench_function("client_hello/sni", |b| b.iter(|| server_name(black_box(&hello))));
}

criterion_group!(benches, bench);
criterion_main!(benches);
