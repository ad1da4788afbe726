//! Backend selection per new connection: plain Maglev (before/after the
//! balance rules), bounded loads, least_conn, random_two; alone and with a
//! second thread counting connections on the same backends.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use ringlb::config::Balance;
use ringlb::conn::select::{select_hash, MAX_CANDIDATES};
use ringlb::snapshot::{Backend, PoolSnapshot};

const WORKERS: usize = 2;

fn pool(n: usize, balance: Balance, factor: Option<u32>) -> PoolSnapshot {
    let backends: Vec<Arc<Backend>> = (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                format!("10.0.{}.{}:5432", i >> 8, i & 0xff).parse().unwrap(),
                WORKERS,
            ))
        })
        .collect();
    let mut p = PoolSnapshot::build("p", 1, 65537, backends, vec![1000; n]).unwrap();
    p.balance = balance;
    p.hash_balance_factor = factor;
    // Some open connections, unevenly, so the rules have work to do.
    for (i, b) in p.backends.iter().enumerate() {
        b.stats.conns.opened.add((i * 7 % 13) as u64);
    }
    p
}

/// The selection as it was before the balance rules: the table's
/// candidates copied out, nothing else (the baseline of "after").
fn before(pool: &PoolSnapshot, hash: u64) -> u32 {
    let (table, _) = pool.table_for(std::net::Ipv4Addr::LOCALHOST.into());
    let mut out = [0u32; MAX_CANDIDATES];
    let mut n = 0;
    for i in table.unwrap().candidates(hash, MAX_CANDIDATES) {
        out[n] = i;
        n += 1;
    }
    out[..n].iter().fold(0, |a, x| a ^ x)
}

fn run(c: &mut Criterion, name: &str, contended: bool) {
    let hashes: Vec<u64> = (0..4096u64)
        .map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()))
        .collect();
    let ip = std::net::Ipv4Addr::LOCALHOST.into();
    let mut g = c.benchmark_group(name);
    let cases = [
        ("maglev_before", Balance::Maglev, None),
        ("maglev", Balance::Maglev, None),
        ("maglev_bounded_125", Balance::Maglev, Some(125)),
        ("least_conn", Balance::LeastConn, None),
        ("random_two", Balance::RandomTwo, None),
    ];
    for (case, balance, factor) in cases {
        let p = Arc::new(pool(10, balance, factor));
        // The contended variant: another thread (worker 1) opens and closes
        // connections on every backend of the pool meanwhile, as a second
        // worker would; this thread is worker 0.
        let stop = Arc::new(AtomicBool::new(false));
        let other = contended.then(|| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                ringlb::stats::set_worker_slot(1);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let b = &p.backends[i % p.backends.len()];
                    b.stats.conns.opened.inc();
                    b.stats.conns.closed.inc();
                    i += 1;
                }
            })
        });
        ringlb::stats::set_worker_slot(0);
        let mut i = 0usize;
        g.bench_function(case, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                if case == "maglev_before" {
                    before(&p, black_box(hashes[i]))
                } else {
                    let s = select_hash(&p, ip, black_box(hashes[i]), MAX_CANDIDATES).unwrap();
                    s.candidates()[0]
                }
            })
        });
        stop.store(true, Ordering::Relaxed);
        if let Some(t) = other {
            t.join().unwrap();
        }
    }
    g.finish();
}

fn alone(c: &mut Criterion) {
    run(c, "select_10_backends", false);
}

fn with_a_busy_worker(c: &mut Criterion) {
    run(c, "select_10_backends_other_worker_counting", true);
}

criterion_group!(benches, alone, with_a_busy_worker);
criterion_main!(benches);
