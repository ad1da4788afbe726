//! Geo micro-benchmarks: region map build/lookup at GeoIP scale, prefix parsing, spill-over weights.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ringlb::geo::{effective_weights, parse_prefixes, Cidr, GeoBackend, RegionId, RegionMap, SpillThreshold};

/// Prefix count of a full GeoIP country export, roughly.
const PREFIXES: usize = 500_000;

/// splitmix64: deterministic, dependency-free, good enough to scatter prefixes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn v4(addr: u32, len: u8) -> Cidr {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Cidr::new(IpAddr::V4(Ipv4Addr::from(addr & mask)), len).unwrap()
}

fn v6(addr: u128, len: u8) -> Cidr {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Cidr::new(IpAddr::V6(Ipv6Addr::from(addr & mask)), len).unwrap()
}

/// 500,000 distinct prefixes: ~85 % IPv4 /8–/32 (mostly /16–/24, as in GeoIP exports),
/// ~15 % IPv6 /19–/64 under 2000::/3; about a third are carved out of an earlier prefix,
/// so nesting is common. 250 regions, like countries.
fn prefixes() -> Vec<(Cidr, RegionId)> {
    let mut rng = Rng(0x5eed);
    let mut seen = std::collections::HashSet::with_capacity(PREFIXES);
    let mut out: Vec<(Cidr, RegionId)> = Vec::with_capacity(PREFIXES);
    while out.len() < PREFIXES {
        let region = RegionId(rng.below(250) as u16);
        let nested = !out.is_empty() && rng.below(3) == 0;
        let is_v6 = rng.below(100) < 15;
        let cidr = if nested {
            // A longer prefix inside a random earlier one, same family as that one.
            let (parent, _) = out[rng.below(out.len() as u64) as usize];
            let max = if parent.addr().is_ipv4() { 32 } else { 64 };
            if parent.prefix_len() >= max {
                continue;
            }
            let len = parent.prefix_len() + 1 + rng.below(u64::from(max - parent.prefix_len())) as u8;
            match parent.addr() {
                IpAddr::V4(a) => {
                    let host = !u32::MAX.checked_shl(32 - u32::from(parent.prefix_len())).unwrap_or(0);
                    v4(u32::from(a) | (rng.next() as u32 & host), len)
                }
                IpAddr::V6(a) => {
                    let host = !u128::MAX.checked_shl(128 - u32::from(parent.prefix_len())).unwrap_or(0);
                    let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
                    v6(u128::from(a) | (r & host), len)
                }
            }
        } else if is_v6 {
            let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            v6((0x2u128 << 124) | (r >> 3), 19 + rng.below(46) as u8)
        } else {
            let len = match rng.below(10) {
                0 => 8 + rng.below(8) as u8,
                1 => 25 + rng.below(8) as u8,
                _ => 16 + rng.below(9) as u8,
            };
            v4(rng.next() as u32, len)
        };
        if seen.insert(cidr) {
            out.push((cidr, region));
        }
    }
    out
}

/// Lookup probes: 85 % random IPv4, 15 % random addresses inside the IPv6 prefixes.
fn probes(prefixes: &[(Cidr, RegionId)]) -> Vec<IpAddr> {
    let mut rng = Rng(0xadd7);
    let v6: Vec<Cidr> = prefixes
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| c.addr().is_ipv6())
        .collect();
    (0..1 << 16)
        .map(|_| {
            if rng.below(100) < 85 {
                IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
            } else {
                let c = v6[rng.below(v6.len() as u64) as usize];
                let host = !u128::MAX.checked_shl(128 - u32::from(c.prefix_len())).unwrap_or(0);
                let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
                let IpAddr::V6(a) = c.addr() else { unreachable!() };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | (r & host)))
            }
        })
        .collect()
}

fn region_map(c: &mut Criterion) {
    let input = prefixes();
    let map = RegionMap::new(input.clone(), RegionId(0)).unwrap();
    let (r4, r6) = map.range_count();
    println!(
        "region map: {} prefixes -> {} IPv4 + {} IPv6 ranges, memory_bytes = {} ({:.1} MiB)",
        map.prefix_count(),
        r4,
        r6,
        map.memory_bytes(),
        map.memory_bytes() as f64 / (1024.0 * 1024.0)
    );

    let mut g = c.benchmark_group("geo");
    g.sample_size(10);
    g.bench_function("region_map_build_500k", |b| {
        b.iter_batched(
            || input.clone(),
            |v| RegionMap::new(v, RegionId(0)).unwrap(),
            BatchSize::LargeInput,
        )
    });
    let text: String = input.iter().map(|(c, r)| format!("{c},r{}\n", r.0)).collect();
    g.bench_function("parse_prefixes_500k_lines", |b| {
        b.iter(|| parse_prefixes(black_box(&text), "bench.csv").unwrap())
    });
    g.finish();

    // One lookup per iteration, cycling through precomputed random addresses, so the
    // reported time is per lookup.
    let mixed = probes(&input);
    let only_v4: Vec<IpAddr> = mixed.iter().copied().filter(IpAddr::is_ipv4).collect();
    let only_v6: Vec<IpAddr> = mixed.iter().copied().filter(IpAddr::is_ipv6).collect();
    let mut g = c.benchmark_group("geo");
    for (name, addrs) in [
        ("region_map_lookup_500k_mixed", &mixed),
        ("region_map_lookup_500k_v4", &only_v4),
        ("region_map_lookup_500k_v6", &only_v6),
    ] {
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                if i == addrs.len() {
                    i = 0;
                }
                map.lookup(black_box(addrs[i]))
            })
        });
    }
    g.finish();
}

fn policy(c: &mut Criterion) {
    let mut rng = Rng(0x9011c7);
    // 10 regions × 100 backends, ~10 % unusable, weights 1..=100.
    let backends: Vec<GeoBackend> = (0..1000)
        .map(|i| GeoBackend {
            region: RegionId(1 + (i / 100) as u16),
            weight: 1 + rng.below(100) as u32,
            usable: rng.below(10) != 0,
        })
        .collect();
    let multipliers: Vec<u32> = (0..11).map(|r| if r == 1 { 100 } else { 1 + r }).collect();
    c.bench_function("geo/effective_weights_10x100", |b| {
        b.iter(|| {
            effective_weights(
                black_box(&backends),
                |r| multipliers[usize::from(r.0)],
                SpillThreshold::default(),
            )
        })
    });
}

criterion_group!(benches, region_map, policy);
criterion_main!(benches);
