//! Micro-benchmarks of the UDP flow table: lookup hit, insert + remove, expiry per flow.
use std::collections::HashMap;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ringlb::udp::flow_table::FlowTable;

const SIZES: [u32; 2] = [100_000, 1_000_000];
const TIMEOUT: Duration = Duration::from_secs(64);
/// Keys looked up per iteration, in scattered order so that big tables miss cache as
/// they would under real traffic.
const PROBES: usize = 4096;

/// Client address number `i`: distinct for every `i` below 2^32.
fn client(i: u32) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(0x0a00_0000 | (i >> 4)),
        40_000 + (i & 0xf) as u16,
    ))
}

/// Deterministic scatter of `0..n` (xorshift), so runs are comparable.
fn probes(n: u32) -> Vec<SocketAddr> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..PROBES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            client((x % u64::from(n)) as u32)
        })
        .collect()
}

/// `n` flows, all seen at `t0`.
fn filled(n: u32, capacity: usize, t0: Instant) -> FlowTable<SocketAddr, u64> {
    let mut t = FlowTable::new(capacity, TIMEOUT, t0);
    for i in 0..n {
        t.insert(client(i), u64::from(i), t0).expect("sized to fit");
    }
    t
}

fn get_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_table/get_hit");
    g.throughput(Throughput::Elements(PROBES as u64));
    for n in SIZES {
        let t0 = Instant::now();
        let mut t = filled(n, n as usize, t0);
        let keys = probes(n);
        let now = t0 + Duration::from_secs(1);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for k in &keys {
                    sum = sum.wrapping_add(*t.get(k, now).expect("hit"));
                }
                black_box(sum)
            })
        });
    }
    g.finish();
}

/// Plain `HashMap::get_mut` on the same keys: the floor `get_hit` is compared with.
fn std_hashmap_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_table/std_hashmap_get");
    g.throughput(Throughput::Elements(PROBES as u64));
    for n in SIZES {
        let mut m: HashMap<SocketAddr, u64> = (0..n).map(|i| (client(i), u64::from(i))).collect();
        let keys = probes(n);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for k in &keys {
                    sum = sum.wrapping_add(*m.get_mut(k).expect("hit"));
                }
                black_box(sum)
            })
        });
    }
    g.finish();
}

fn insert_remove(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_table/insert_remove");
    g.throughput(Throughput::Elements(PROBES as u64));
    for n in SIZES {
        let t0 = Instant::now();
        // Room for the probes on top of `n` resident flows.
        let mut t = filled(n, n as usize + PROBES, t0);
        let fresh: Vec<SocketAddr> = (0..PROBES as u32).map(|i| client(n + i)).collect();
        let now = t0 + Duration::from_secs(1);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                for (i, k) in fresh.iter().enumerate() {
                    t.insert(*k, i as u64, now).expect("room");
                }
                for k in &fresh {
                    black_box(t.remove(k));
                }
            })
        });
    }
    g.finish();
}

/// Flows arriving evenly over one timeout, then `expire` called every tick until all
/// are gone: the steady-state per-worker pattern. Reported per expired flow.
/// Expires every flow, one wheel tick at a time from `first`; returns the
/// (empty) table so that dropping it is not timed.
fn expire_all(
    mut t: FlowTable<SocketAddr, u64>,
    mut out: Vec<(SocketAddr, u64)>,
    first: Instant,
) -> FlowTable<SocketAddr, u64> {
    let tick = t.tick();
    let mut now = first;
    while !t.is_empty() {
        t.expire(now, &mut out);
        out.clear();
        now += tick;
    }
    t
}

fn expire(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_table/expire");
    g.sample_size(10);
    for n in SIZES {
        g.throughput(Throughput::Elements(u64::from(n)));
        let t0 = Instant::now();
        let setup = || {
            let mut t = FlowTable::new(n as usize, TIMEOUT, t0);
            for i in 0..n {
                let at = t0 + TIMEOUT * i / n;
                t.insert(client(i), u64::from(i), at).expect("sized to fit");
            }
            (t, Vec::with_capacity(n as usize))
        };
        g.bench_function(BenchmarkId::new("idle", n), |b| {
            b.iter_batched(
                setup,
                |(t, out)| expire_all(t, out, t0 + TIMEOUT),
                BatchSize::PerIteration,
            )
        });
        // Same, but every flow was refreshed halfway: each is visited once at its
        // original slot and re-filed before it expires (the lazy-refresh cost).
        let setup_refreshed = || {
            let (mut t, out) = setup();
            for i in 0..n {
                t.touch(&client(i), t0 + TIMEOUT * i / n + TIMEOUT / 2);
            }
            (t, out)
        };
        g.bench_function(BenchmarkId::new("refreshed", n), |b| {
            b.iter_batched(
                setup_refreshed,
                |(t, out)| expire_all(t, out, t0 + TIMEOUT),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, get_hit, std_hashmap_get, insert_remove, expire);
criterion_main!(benches);
