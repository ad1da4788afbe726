//! The per-datagram cost of the game-server features on a UDP listener: token
//! read (and strip) and the PROXY v2 header, as `udp::datagram::prepare` does
//! them in the receive buffer, and the token memory touched per datagram.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ringlb::config::{ProxyProtocol, TokenConfig};
use ringlb::udp::datagram::prepare;
use ringlb::udp::flow_table::FlowTable;

const HEAD: usize = 64;

/// A bench case: name, token setting, PROXY setting, (client, local).
type Case = (
    &'static str,
    Option<TokenConfig>,
    ProxyProtocol,
    (SocketAddr, SocketAddr),
);

fn bench(c: &mut Criterion) {
    let v4: (SocketAddr, SocketAddr) = (
        "192.0.2.7:56324".parse().unwrap(),
        "198.51.100.1:27100".parse().unwrap(),
    );
    let v6: (SocketAddr, SocketAddr) = (
        "[2001:db8:1:2:3:4:5:6]:56324".parse().unwrap(),
        "[2001:db8::1]:27100".parse().unwrap(),
    );
    let end16 = TokenConfig {
        offset: -16,
        length: 16,
        strip: false,
    };
    let cases: [Case; 6] = [
        ("off", None, ProxyProtocol::Off, v4),
        ("proxy_v2/ipv4", None, ProxyProtocol::V2, v4),
        ("proxy_v2/ipv6", None, ProxyProtocol::V2, v6),
        ("token16", Some(end16), ProxyProtocol::Off, v4),
        (
            "token16_strip",
            Some(TokenConfig { strip: true, ..end16 }),
            ProxyProtocol::Off,
            v4,
        ),
        (
            "token16_strip_middle",
            Some(TokenConfig {
                offset: 8,
                length: 16,
                strip: true,
            }),
            ProxyProtocol::Off,
            v4,
        ),
    ];
    for size in [64usize, 1200] {
        for (name, token, proxy, (client, local)) in &cases {
            let mut buf = vec![7u8; HEAD + size];
            c.bench_function(&format!("udp_datagram/{name}/{size}B"), |b| {
                b.iter(|| {
                    let r = prepare(
                        black_box(token.as_ref()),
                        black_box(*proxy),
                        black_box(*client),
                        black_box(*local),
                        &mut buf,
                        HEAD..HEAD + size,
                    );
                    black_box(r.map(|(h, r)| (h, r.len())).ok())
                })
            });
        }
    }
    // An established flow of a token listener refreshes its token's entry
    // on every datagram: one more hash lookup in a table of this many tokens.
    let now = Instant::now();
    let mut tokens: FlowTable<u64, u32> = FlowTable::new(1 << 20, Duration::from_secs(60), now);
    let n = 100_000u64;
    for i in 0..n {
        let _ = tokens.insert(ringlb::flow_key::token_hash(&i.to_le_bytes()), 0, now);
    }
    let mut i = 0u64;
    c.bench_function("udp_datagram/token_memory_touch/100k_tokens", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            black_box(tokens.touch(&ringlb::flow_key::token_hash(&i.to_le_bytes()), now))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
