//! Criterion: rebuild + publish of a pool snapshot (the control plane's
//! work on every health or config change), plain and geo-weighted; and the
//! fleet tools' per-request work (pool fingerprint, live what-if).

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use ringlb::config::Config;
use ringlb::model::Model;
use ringlb::snapshot::Snapshot;

fn pool_config(backends: usize, geo_regions: usize) -> String {
    let mut c =
        String::from("[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n\n[[pool]]\nname = \"p\"\n");
    if geo_regions > 0 {
        c.push_str("[pool.geo]\n");
        for r in 0..geo_regions {
            let row: Vec<String> = (0..geo_regions)
                .map(|q| format!("r{q} = {}", if q == r { 100 } else { 1 }))
                .collect();
            c.push_str(&format!("r{r} = {{ {} }}\n", row.join(", ")));
        }
    }
    for i in 0..backends {
        c.push_str(&format!(
            "[[pool.backend]]\naddr = \"10.{}.{}.{}:80\"\n",
            i / 65536,
            (i / 256) % 256,
            i % 256
        ));
        if geo_regions > 0 {
            c.push_str(&format!("region = \"r{}\"\n", i % geo_regions));
        }
    }
    c
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild_and_publish");
    for (name, backends, regions) in [("1000_backends", 1000, 0), ("100_backends_10_regions", 100, 10)] {
        let config = Config::parse(&pool_config(backends, regions), std::path::Path::new("bench.toml")).unwrap();
        let mut model = Model::new(config, 2, Instant::now(), 1).0;
        let published = ArcSwap::from_pointee(Snapshot::default());
        group.bench_function(name, |b| {
            b.iter(|| {
                let _ = model.rebuild(0, Instant::now());
                published.store(Arc::new(model.snapshot()));
            })
        });
        // From the model, not `published`: a name filter (e.g. `-- fleet`)
        // skips the iterations that would have stored a snapshot.
        let tables = model.pools[0].published.geo.as_ref().map_or(1, |g| g.tables.len());
        println!(
            "{name}: {tables} table(s) of 65537 slots = {} KiB",
            tables * 65537 * 4 / 1024
        );
    }
    group.finish();

    // Fleet tools: the fingerprint `ctl status` / `ctl backends` / `/metrics`
    // compute per pool and request, and a live `ctl what-if` (two plans and
    // builds, and the slot-by-slot comparison).
    let mut group = c.benchmark_group("fleet");
    for (name, backends, regions) in [("1000_backends", 1000, 0), ("100_backends_10_regions", 100, 10)] {
        let config = Config::parse(&pool_config(backends, regions), std::path::Path::new("bench.toml")).unwrap();
        let (model, _) = Model::new(config, 2, Instant::now(), 1);
        let pool = &model.pools[0];
        group.bench_function(format!("fingerprint_{name}"), |b| {
            b.iter(|| ringlb::fleet::fingerprint::pool_fingerprint(&pool.published, pool.config.table_size))
        });
        let change = ringlb::whatif::Change::Remove(pool.backends[0].config.addr);
        group.bench_function(format!("what_if_remove_{name}"), |b| {
            b.iter(|| ringlb::whatif::live(&model, "p", &change, Instant::now()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
