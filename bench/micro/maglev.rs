//! Maglev micro-benchmarks: table build at the default size, and per-flow lookup.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringlb::maglev::{MaglevTable, DEFAULT_TABLE_SIZE};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// `n` backends named like real addresses, with the given weight per index.
fn backends(n: usize, weight: impl Fn(usize) -> u32) -> Vec<(String, u32)> {
    (0..n)
        .map(|i| {
            (
                format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 0xff, i & 0xff),
                weight(i),
            )
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build_65537");
    for n in [10usize, 100, 1000] {
        let equal = backends(n, |_| 1);
        g.bench_with_input(BenchmarkId::new("equal", n), &equal, |b, x| {
            b.iter(|| MaglevTable::build(black_box(x), DEFAULT_TABLE_SIZE).unwrap())
        });
    }
    // Weights 1..=4 exercise the lighter-backend scheduling path.
    let weighted = backends(100, |i| (i % 4) as u32 + 1);
    g.bench_with_input(BenchmarkId::new("weighted_1to4", 100), &weighted, |b, x| {
        b.iter(|| MaglevTable::build(black_box(x), DEFAULT_TABLE_SIZE).unwrap())
    });
    // The skewed case: one heavy backend, the rest due only on round 0.
    let skewed = backends(1000, |i| if i == 0 { 1_000_000 } else { 1 });
    g.bench_with_input(BenchmarkId::new("one_heavy", 1000), &skewed, |b, x| {
        b.iter(|| MaglevTable::build(black_box(x), DEFAULT_TABLE_SIZE).unwrap())
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let table = MaglevTable::build(&backends(100, |_| 1), DEFAULT_TABLE_SIZE).unwrap();
    // 18-byte flow keys (IPv6 or IPv4-mapped address + port), varied so the
    // reads spread over the whole table as real traffic does.
    let keys: Vec<[u8; 18]> = (0..4096u32)
        .map(|i| {
            let mut k = [0u8; 18];
            k[10] = 0xff;
            k[11] = 0xff;
            k[12..16].copy_from_slice(&(0x0a00_0000 + i * 7919).to_be_bytes());
            k[16..].copy_from_slice(&((i * 31) as u16).to_be_bytes());
            k
        })
        .collect();
    let hashes: Vec<u64> = keys.iter().map(|k| xxh3_64(k)).collect();

    let mut g = c.benchmark_group("maglev_lookup_65537");
    let mut i = 0usize;
    g.bench_function("hash_and_lookup", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let h = xxh3_64_with_seed(black_box(&keys[i]), ringlb::flow_key::FLOW_HASH_SEED);
            table.lookup(h)
        })
    });
    let mut i = 0usize;
    g.bench_function("lookup_only", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            table.lookup(black_box(hashes[i]))
        })
    });
    let mut i = 0usize;
    g.bench_function("candidates_4", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            table.candidates(black_box(hashes[i]), 4).fold(0u32, |a, x| a ^ x)
        })
    });
    g.finish();
}

criterion_group!(benches, build, lookup);
criterion_main!(benches);
