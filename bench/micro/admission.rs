//! Micro-benchmarks of admission control: source-table admits and connection limits.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ringlb::admission::{BucketParams, ConnLimit, SourceKey, SourceTable, DEFAULT_MAX_SOURCES};

/// Distinct IPv6 /128 keys.
fn key(i: u64) -> SourceKey {
    SourceKey::from_ip(
        std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)).into(),
        32,
        128,
    )
}

/// Resident set size in bytes (Linux), to check the table's memory figure against reality.
fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A table of `cap` sources with every slot in use, and the next unused key.
fn full_table(params: BucketParams, cap: usize, t0: Instant) -> (SourceTable, u64) {
    let before = rss_bytes();
    let table = SourceTable::new(params, cap);
    // Shards fill unevenly (random hash), so keep adding sources until every one is full.
    let mut i = 0u64;
    while table.len() < cap {
        for _ in 0..cap / 10 {
            let _ = table.admit(key(i), t0);
            i += 1;
        }
    }
    let after = rss_bytes();
    eprintln!(
        "source table at cap {}: approx_memory_bytes = {} ({:.1} MiB), bound = {}, RSS delta = {:?} MiB",
        cap,
        table.approx_memory_bytes(),
        table.approx_memory_bytes() as f64 / (1 << 20) as f64,
        SourceTable::memory_bound_bytes(cap),
        before
            .zip(after)
            .map(|(b, a)| (a.saturating_sub(b)) as f64 / (1 << 20) as f64),
    );
    (table, i)
}

fn admission(c: &mut Criterion) {
    let params = BucketParams::new(100.0, 10).unwrap();
    let t0 = Instant::now();
    let (table, mut next) = full_table(params, DEFAULT_MAX_SOURCES, t0);

    let mut g = c.benchmark_group("admission");
    // An existing source: one probe, one bucket update. Time moves 1 us per call.
    let hot = key(12_345);
    let mut tick = 0u64;
    g.bench_function("admit_existing_key", |b| {
        b.iter(|| {
            tick += 1;
            table.admit(black_box(hot), t0 + Duration::from_micros(tick))
        })
    });
    // A never-seen source every call on the full table: probe miss, clock-hand sample,
    // eviction, re-insert.
    g.bench_function("admit_new_key_evicting", |b| {
        b.iter(|| {
            next += 1;
            tick += 1;
            table.admit(black_box(key(next)), t0 + Duration::from_micros(tick))
        })
    });
    // Same on a 16,384-source table (1 MiB, cache-resident): the arithmetic alone, without
    // the DRAM misses that dominate at 1M sources.
    let small = SourceTable::new(params, 16_384);
    g.bench_function("admit_new_key_evicting_16k", |b| {
        b.iter(|| {
            next += 1;
            tick += 1;
            small.admit(black_box(key(next)), t0 + Duration::from_micros(tick))
        })
    });
    // The full-table path of issue 17 item 4: every entry is being limited (burst 1, rate
    // 1/1000 s: none is full again during the run, so none is evictable) and every call
    // is a never-seen source: probe miss, sketch hash and 4 buckets, the clock-hand sample
    // (finds nothing idle), then a sketch charge or refusal. As the run goes on the
    // sketch fills, so the figure mixes admissions and refusals; the mix is printed.
    let limited = BucketParams::new(0.001, 1).unwrap();
    for (name, cap) in [
        ("admit_new_key_table_full_of_limited", DEFAULT_MAX_SOURCES),
        ("admit_new_key_table_full_of_limited_16k", 16_384),
    ] {
        let (table, mut fresh) = full_table(limited, cap, t0);
        let rss_before = rss_bytes();
        g.bench_function(name, |b| {
            b.iter(|| {
                fresh += 1;
                tick += 1;
                table.admit(black_box(key(fresh)), t0 + Duration::from_micros(tick))
            })
        });
        let st = table.stats();
        eprintln!(
            "{name}: evictions {}, sketch admitted {}, sketch refused {}; RSS grew {:?} KiB during the flood",
            st.evictions,
            st.sketch_admitted,
            st.table_full,
            rss_before.zip(rss_bytes()).map(|(b, a)| a.saturating_sub(b) / 1024),
        );
    }
    let limit = ConnLimit::new(1_000);
    g.bench_function("conn_limit_acquire_release", |b| {
        b.iter(|| {
            let ok = limit.try_acquire();
            if ok {
                limit.release();
            }
            black_box(ok)
        })
    });
    g.finish();
    eprintln!("evictions during run: {}", table.stats().evictions);
}

criterion_group!(benches, admission);
criterion_main!(benches);
