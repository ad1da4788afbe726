//! Invariant property tests on the control-plane model (`ringlb::model::Model`).
//!
//! A generator produces random operation sequences over 2–3 pools of 1–6
//! backends whose addresses come from a small fixed set, so re-adds and
//! duplicates happen: `ctl` commands (add, remove, drain, disable, enable,
//! weight, with some invalid arguments), reloads (random subsets, weights and
//! pool settings), active check results (through `due_checks`, with the
//! scheduled job's epoch), passive connect failures (the shared counter the
//! workers bump, then a tick), connections opening and closing, and ticks with
//! synthetic time. After every step one invariant is checked; each invariant
//! has its own test so one failing does not hide the others.
//!
//! Everything runs on synthetic instants (`t0 + ms`): the model takes `now`
//! everywhere, so a case replays exactly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use ringlb::config::Config;
use ringlb::health::state::AdminState;
use ringlb::model::{CheckJob, Model, PoolState};
use ringlb::snapshot::{Backend, PoolSnapshot};

// === the world ===

const ADDRS: [&str; 6] = [
    "10.0.0.1:80",
    "10.0.0.2:80",
    "10.0.0.3:80",
    "10.0.0.4:80",
    "10.0.0.5:80",
    "10.0.0.6:80",
];
/// Pool "a" has no active checks, "b" tcp checks (initially up), "c" tcp
/// checks starting down. "c" may come and go with reloads.
const POOLS: [&str; 3] = ["a", "b", "c"];

fn pool_name(i: u8) -> &'static str {
    POOLS.get(i as usize).copied().unwrap_or("nosuch")
}

/// Commands on some addresses carry `--force` (the operator's escape hatch),
/// the rest do not: both paths are exercised.
fn forced(addr: u8) -> bool {
    addr % 3 == 0
}

fn addr_text(i: u8) -> &'static str {
    ADDRS.get(i as usize).copied().unwrap_or("not-an-address")
}

fn addr(i: u8) -> SocketAddr {
    ADDRS[i as usize].parse().unwrap()
}

// === config specs ===

#[derive(Clone)]
struct PoolSpec {
    /// (address index, weight), distinct addresses, at least one weight > 0.
    backends: Vec<(u8, u32)>,
    table_size: usize,
    drain_ms: u64,
    panic_pct: u32,
    slow_start_ms: u64,
    rise_fall: (u32, u32),
    outlier_failures: u32,
    eject_pct: u32,
}

#[derive(Clone)]
struct ConfigSpec {
    /// a and b always present; c optional.
    pools: Vec<Option<PoolSpec>>,
}

impl ConfigSpec {
    fn toml(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.pools.iter().enumerate() {
            if p.is_some() {
                s += &format!(
                    "[[listener]]\nname = \"l{n}\"\nbind = \"127.0.0.1:{port}\"\npool = \"{n}\"\n\n",
                    n = POOLS[i],
                    port = 10_000 + i
                );
            }
        }
        for (i, p) in self.pools.iter().enumerate() {
            let Some(p) = p else { continue };
            s += &format!(
                "[[pool]]\nname = \"{}\"\ntable_size = {}\ndrain_timeout = \"{}ms\"\npanic_threshold = {}.0\nslow_start = \"{}ms\"\n",
                POOLS[i], p.table_size, p.drain_ms, p.panic_pct, p.slow_start_ms
            );
            if i > 0 {
                s += &format!(
                    "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\ntimeout = \"500ms\"\njitter = \"0ms\"\nrise = {}\nfall = {}\n{}",
                    p.rise_fall.0,
                    p.rise_fall.1,
                    if i == 2 { "initial_state = \"down\"\n" } else { "" }
                );
            }
            s += &format!(
                "[pool.outlier]\nconsecutive_failures = {}\nejection_time = \"1s\"\nmax_ejection_time = \"4s\"\nmax_ejection_percent = {}.0\n",
                p.outlier_failures, p.eject_pct
            );
            for (a, w) in &p.backends {
                s += &format!("[[pool.backend]]\naddr = \"{}\"\nweight = {w}\n", ADDRS[*a as usize]);
            }
            s += "\n";
        }
        s
    }

    fn config(&self) -> Config {
        let text = self.toml();
        Config::parse(&text, Path::new("props.toml"))
            .unwrap_or_else(|e| panic!("generated config invalid: {e}\n{text}"))
    }
}

fn pool_spec() -> impl Strategy<Value = PoolSpec> {
    let backends = (
        proptest::sample::subsequence((0u8..6).collect::<Vec<_>>(), 1..=6).prop_shuffle(),
        proptest::collection::vec(prop_oneof![1 => Just(0u32), 3 => 1u32..4], 6),
    )
        .prop_map(|(addrs, weights)| {
            let mut v: Vec<(u8, u32)> = addrs.into_iter().zip(weights).collect();
            if v.iter().all(|(_, w)| *w == 0) {
                v[0].1 = 1;
            }
            v
        });
    (
        backends,
        prop_oneof![Just(7usize), Just(13), Just(101)],
        prop_oneof![Just(0u64), Just(300), Just(2_000)],
        prop_oneof![Just(0u32), Just(50), Just(100)],
        prop_oneof![3 => Just(0u64), 1 => Just(2_000)],
        prop_oneof![3 => Just((2u32, 2u32)), 1 => Just((1, 1))],
        prop_oneof![Just(0u32), Just(3)],
        prop_oneof![Just(50u32), Just(100)],
    )
        .prop_map(
            |(backends, table_size, drain_ms, panic_pct, slow_start_ms, rise_fall, outlier_failures, eject_pct)| {
                PoolSpec {
                    backends,
                    table_size,
                    drain_ms,
                    panic_pct,
                    slow_start_ms,
                    rise_fall,
                    outlier_failures,
                    eject_pct,
                }
            },
        )
}

fn config_spec() -> impl Strategy<Value = ConfigSpec> {
    (pool_spec(), pool_spec(), proptest::option::weighted(0.7, pool_spec())).prop_map(|(a, b, c)| ConfigSpec {
        pools: vec![Some(a), Some(b), c],
    })
}

// === operations ===

#[derive(Clone)]
enum Op {
    Add {
        pool: u8,
        addr: u8,
        weight: Option<i64>,
    },
    Remove {
        pool: u8,
        addr: u8,
    },
    Drain {
        pool: u8,
        addr: u8,
    },
    Disable {
        pool: u8,
        addr: u8,
    },
    Enable {
        pool: u8,
        addr: u8,
    },
    Weight {
        pool: u8,
        addr: u8,
        weight: i64,
    },
    Reload(ConfigSpec),
    /// Runs `due_checks`, then completes one pending job (pick % pending).
    Check {
        pick: u8,
        passed: Option<bool>,
    },
    /// A worker's connects to a backend in the table fail `n` times, then a tick.
    Passive {
        pool: u8,
        addr: u8,
        n: u8,
    },
    /// A connection opens on a backend in the table.
    Open {
        pool: u8,
        addr: u8,
    },
    /// One connection of that backend ends.
    Close {
        pool: u8,
        addr: u8,
    },
    /// Time passes, then a tick.
    Tick {
        ms: u16,
    },
}

fn pool_ix() -> impl Strategy<Value = u8> {
    prop_oneof![12 => 0u8..3, 1 => Just(3u8)]
}

fn addr_ix() -> impl Strategy<Value = u8> {
    prop_oneof![12 => 0u8..6, 1 => Just(6u8)]
}

fn weight_arg() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 4 => 1i64..4, 1 => Just(-1i64), 1 => Just(2_000_000i64)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (pool_ix(), addr_ix(), proptest::option::of(weight_arg()))
            .prop_map(|(pool, addr, weight)| Op::Add { pool, addr, weight }),
        2 => (pool_ix(), addr_ix()).prop_map(|(pool, addr)| Op::Remove { pool, addr }),
        2 => (pool_ix(), addr_ix()).prop_map(|(pool, addr)| Op::Drain { pool, addr }),
        1 => (pool_ix(), addr_ix()).prop_map(|(pool, addr)| Op::Disable { pool, addr }),
        2 => (pool_ix(), addr_ix()).prop_map(|(pool, addr)| Op::Enable { pool, addr }),
        3 => (pool_ix(), addr_ix(), weight_arg()).prop_map(|(pool, addr, weight)| Op::Weight { pool, addr, weight }),
        2 => config_spec().prop_map(Op::Reload),
        4 => (any::<u8>(), prop_oneof![4 => Just(Some(true)), 4 => Just(Some(false)), 1 => Just(None)])
            .prop_map(|(pick, passed)| Op::Check { pick, passed }),
        2 => (0u8..3, 0u8..6, 1u8..5).prop_map(|(pool, addr, n)| Op::Passive { pool, addr, n }),
        2 => (0u8..3, 0u8..6).prop_map(|(pool, addr)| Op::Open { pool, addr }),
        1 => (0u8..3, 0u8..6).prop_map(|(pool, addr)| Op::Close { pool, addr }),
        4 => prop_oneof![Just(0u16), 1u16..3_000].prop_map(|ms| Op::Tick { ms }),
    ]
}

fn scenario() -> impl Strategy<Value = (ConfigSpec, Vec<Op>)> {
    (config_spec(), proptest::collection::vec(op(), 1..40))
}

// Compact, one-line forms, so a minimal failing sequence reads as a script.

impl std::fmt::Debug for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b: Vec<String> = self
            .backends
            .iter()
            .map(|(a, w)| format!("{} w{w}", ADDRS[*a as usize]))
            .collect();
        write!(
            f,
            "[{}] table_size={} drain={}ms panic={}% slow_start={}ms rise/fall={}/{} outlier={} eject={}%",
            b.join(", "),
            self.table_size,
            self.drain_ms,
            self.panic_pct,
            self.slow_start_ms,
            self.rise_fall.0,
            self.rise_fall.1,
            self.outlier_failures,
            self.eject_pct
        )
    }
}

impl std::fmt::Debug for ConfigSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pools: Vec<String> = self
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Some(p) => format!("{}: {p:?}", POOLS[i]),
                None => format!("{}: absent", POOLS[i]),
            })
            .collect();
        write!(f, "{{ {} }}", pools.join(" | "))
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pa = |p: &u8, a: &u8| format!("{} {}", pool_name(*p), addr_text(*a));
        match self {
            Op::Add { pool, addr, weight } => match weight {
                Some(w) => write!(f, "add {} --weight {w}", pa(pool, addr)),
                None => write!(f, "add {}", pa(pool, addr)),
            },
            Op::Remove { pool, addr } => write!(f, "remove {}", pa(pool, addr)),
            Op::Drain { pool, addr } => write!(f, "drain {}", pa(pool, addr)),
            Op::Disable { pool, addr } => write!(f, "disable {}", pa(pool, addr)),
            Op::Enable { pool, addr } => write!(f, "enable {}", pa(pool, addr)),
            Op::Weight { pool, addr, weight } => write!(f, "weight {} {weight}", pa(pool, addr)),
            Op::Reload(spec) => write!(f, "reload {spec:?}"),
            Op::Check { pick, passed } => write!(f, "check #{pick} {passed:?}"),
            Op::Passive { pool, addr, n } => write!(f, "{n} connect failures {} + tick", pa(pool, addr)),
            Op::Open { pool, addr } => write!(f, "open conn {}", pa(pool, addr)),
            Op::Close { pool, addr } => write!(f, "close conn {}", pa(pool, addr)),
            Op::Tick { ms } => write!(f, "tick +{ms}ms"),
        }
    }
}

// === invariants ===

/// Which invariant a test checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inv {
    /// 1: the published table holds only usable backends (all enabled ones in panic).
    OnlyUsable,
    /// 2: a pool with a usable backend publishes a table.
    NeverEmpty,
    /// 2b: every usable backend (every enabled one in panic) has weight in the published snapshot.
    UsableWeighted,
    /// 3: one entry per address per pool, in the model and in the snapshot.
    OneEntry,
    /// 4: drains end by their deadline (closing set, drained removals leave).
    DrainDeadline,
    /// 5: reloads keep operator states of backends that stay; the file wins for membership and weights.
    ReloadKeepsState,
    /// 6: a command that fails changes nothing.
    ErrorChangesNothing,
    /// 7: `ctl weight` never leaves a pool with no backend of weight > 0.
    WeightKeepsOne,
    /// None (generator coverage).
    Nothing,
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// For each backend of `pool`: whether the table must give it weight, and whether the pool panics.
fn expected_in_table(pool: &PoolState, now: Instant) -> (bool, Vec<bool>) {
    let enabled = |b: &&ringlb::model::BackendState| b.admin == AdminState::Enabled;
    let enabled_w: u64 = pool
        .backends
        .iter()
        .filter(enabled)
        .map(|b| u64::from(b.config.weight))
        .sum();
    let healthy_w: u64 = pool
        .backends
        .iter()
        .filter(enabled)
        .filter(|b| b.healthy(now))
        .map(|b| u64::from(b.config.weight))
        .sum();
    let t = pool.config.panic_threshold;
    let threshold = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let panic = (healthy_w as f64) < threshold * enabled_w as f64;
    let v = pool
        .backends
        .iter()
        .map(|b| b.admin == AdminState::Enabled && b.config.weight > 0 && (panic || b.healthy(now)))
        .collect();
    (panic, v)
}

fn snapshot_index(snap: &PoolSnapshot, shared: &Arc<Backend>) -> Option<usize> {
    snap.backends.iter().position(|b| Arc::ptr_eq(b, shared))
}

fn check_only_usable(model: &mut Model, now: Instant) -> Check {
    let snap = model.snapshot();
    ensure!(
        snap.pools.len() == model.pools.len(),
        "snapshot has {} pools, model {}",
        snap.pools.len(),
        model.pools.len()
    );
    for (pool, s) in model.pools.iter().zip(&snap.pools) {
        let name = &pool.config.name;
        ensure!(
            s.weights.len() == s.backends.len(),
            "pool {name}: weights/backends lengths differ"
        );
        let (panic, expected) = expected_in_table(pool, now);
        ensure!(
            pool.panic == panic,
            "pool {name}: model panic = {} but the rule says {panic}",
            pool.panic
        );
        for (j, w) in s.weights.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            let Some(k) = pool
                .backends
                .iter()
                .position(|b| Arc::ptr_eq(&b.shared, &s.backends[j]))
            else {
                return Err(format!(
                    "pool {name}: table weights {} which is no longer in the pool",
                    s.backends[j].addr
                ));
            };
            let b = &pool.backends[k];
            ensure!(
                expected[k],
                "pool {name}: table weights {} ({}, weight {}, panic {panic}) which is not usable",
                b.config.addr,
                b.state_label(now),
                b.config.weight
            );
        }
        if let Some(t) = &s.table {
            for &slot in t.slots() {
                let j = slot as usize;
                ensure!(
                    j < s.backends.len() && s.weights[j] > 0,
                    "pool {name}: a slot points at backend #{j} of weight 0"
                );
            }
        }
    }
    Ok(())
}

fn check_never_empty(model: &mut Model, now: Instant, inv: Inv) -> Check {
    let snap = model.snapshot();
    for (pool, s) in model.pools.iter().zip(&snap.pools) {
        if pool.retired {
            continue;
        }
        let name = &pool.config.name;
        let (_, expected) = expected_in_table(pool, now);
        for (b, _) in pool.backends.iter().zip(&expected).filter(|(_, e)| **e) {
            if inv == Inv::NeverEmpty {
                ensure!(
                    s.table.is_some(),
                    "pool {name}: {} is usable but the published table is empty",
                    b.config.addr
                );
            } else {
                let j = snapshot_index(s, &b.shared);
                ensure!(
                    j.is_some_and(|j| s.weights[j] > 0),
                    "pool {name}: usable backend {} has no weight in the published snapshot",
                    b.config.addr
                );
            }
        }
    }
    Ok(())
}

fn check_one_entry(model: &mut Model) -> Check {
    let snap = model.snapshot();
    for (pool, s) in model.pools.iter().zip(&snap.pools) {
        let name = &pool.config.name;
        let mut seen = Vec::new();
        for b in &pool.backends {
            ensure!(
                !seen.contains(&b.config.addr),
                "pool {name}: {} is listed twice in the model",
                b.config.addr
            );
            seen.push(b.config.addr);
        }
        let mut seen = Vec::new();
        for b in &s.backends {
            ensure!(
                !seen.contains(&b.addr),
                "pool {name}: {} is listed twice in the snapshot",
                b.addr
            );
            seen.push(b.addr);
        }
    }
    Ok(())
}

/// After every step: `closing` only on a drained backend whose deadline a tick has seen.
fn check_closing_only_after_deadline(model: &Model, last_tick: Option<Instant>) -> Check {
    for pool in &model.pools {
        for b in &pool.backends {
            if b.shared.closing.load(Ordering::SeqCst) {
                ensure!(
                    b.admin != AdminState::Enabled,
                    "pool {}: {} is enabled but its connections are being closed",
                    pool.config.name,
                    b.config.addr
                );
                ensure!(
                    b.drain_deadline.is_some_and(|d| last_tick.is_some_and(|t| d <= t)),
                    "pool {}: {} is closing before its drain deadline",
                    pool.config.name,
                    b.config.addr
                );
            }
        }
    }
    Ok(())
}

/// Right after a tick at `now`.
fn check_drains_after_tick(model: &Model, now: Instant) -> Check {
    for pool in &model.pools {
        let name = &pool.config.name;
        for b in &pool.backends {
            if let Some(d) = b.drain_deadline {
                ensure!(
                    now < d || b.shared.closing.load(Ordering::SeqCst),
                    "pool {name}: {} drain deadline passed and a tick ran, but it is not closing",
                    b.config.addr
                );
            }
            ensure!(
                !(b.remove_when_drained && b.shared.stats.conns.current() == 0),
                "pool {name}: {} is removed and drained but still in the pool after a tick",
                b.config.addr
            );
        }
        ensure!(
            !(pool.retired && pool.backends.iter().all(|b| b.shared.stats.conns.current() == 0)),
            "retired pool {name} has no connections left but is still there after a tick"
        );
    }
    Ok(())
}

/// What `ctl backends` and the published tables show.
#[derive(Debug, PartialEq)]
struct PoolView {
    name: String,
    retired: bool,
    panic: bool,
    backends: Vec<BackendRow>,
    generation: u64,
    snap_addrs: Vec<SocketAddr>,
    weights: Vec<u32>,
    slots: Option<Vec<u32>>,
}

#[derive(Debug, PartialEq)]
struct BackendRow {
    addr: SocketAddr,
    label: &'static str,
    admin: AdminState,
    weight: u32,
    removing: bool,
    drain_deadline: Option<Instant>,
    closing: bool,
    reason: String,
    epoch: u64,
}

fn view(model: &Model, now: Instant) -> Vec<PoolView> {
    model
        .pools
        .iter()
        .map(|p| PoolView {
            name: p.config.name.clone(),
            retired: p.retired,
            panic: p.panic,
            backends: p
                .backends
                .iter()
                .map(|b| BackendRow {
                    addr: b.config.addr,
                    label: b.state_label(now),
                    admin: b.admin,
                    weight: b.config.weight,
                    removing: b.remove_when_drained,
                    drain_deadline: b.drain_deadline,
                    closing: b.shared.closing.load(Ordering::SeqCst),
                    reason: b.reason.clone(),
                    epoch: b.epoch,
                })
                .collect(),
            generation: p.published.generation,
            snap_addrs: p.published.backends.iter().map(|b| b.addr).collect(),
            weights: p.published.weights.clone(),
            slots: p.published.table.as_ref().map(|t| t.slots().to_vec()),
        })
        .collect()
}

/// Operator states (and weights) of the live, not-removed backends of each live pool.
fn live_backends(model: &Model) -> Vec<(String, SocketAddr, AdminState, u32)> {
    model
        .pools
        .iter()
        .filter(|p| !p.retired)
        .flat_map(|p| {
            p.backends
                .iter()
                .filter(|b| !b.remove_when_drained)
                .map(|b| (p.config.name.clone(), b.config.addr, b.admin, b.config.weight))
        })
        .collect()
}

fn check_reload(before: &[(String, SocketAddr, AdminState, u32)], spec: &ConfigSpec, model: &Model) -> Check {
    let after = live_backends(model);
    for (i, p) in spec.pools.iter().enumerate() {
        let name = POOLS[i];
        let Some(p) = p else { continue };
        for (a, w) in &p.backends {
            let a = addr(*a);
            let Some(now) = after.iter().find(|(n, x, ..)| n == name && *x == a) else {
                return Err(format!(
                    "pool {name}: {a} is in the file but not in service after the reload"
                ));
            };
            ensure!(
                now.3 == *w,
                "pool {name}: {a} has weight {} after the reload, the file says {w}",
                now.3
            );
            match before.iter().find(|(n, x, ..)| n == name && *x == a) {
                Some(was) => ensure!(
                    now.2 == was.2,
                    "pool {name}: {a} was {:?} before the reload and is {:?} after (it stayed in the file)",
                    was.2,
                    now.2
                ),
                None => ensure!(
                    now.2 == AdminState::Enabled,
                    "pool {name}: {a} added by the reload is {:?}",
                    now.2
                ),
            }
        }
        for (n, a, ..) in after.iter().filter(|(n, ..)| n == name) {
            ensure!(
                p.backends.iter().any(|(x, _)| addr(*x) == *a),
                "pool {n}: {a} is not in the file but still in service after the reload"
            );
        }
    }
    Ok(())
}

fn has_weighted(model: &Model, pool: &str) -> bool {
    model.pool_index(pool).is_some_and(|i| {
        model.pools[i]
            .backends
            .iter()
            .any(|b| !b.remove_when_drained && b.config.weight > 0)
    })
}

// === the harness ===

struct Harness {
    model: Model,
    now: Instant,
    last_tick: Option<Instant>,
    pending: Vec<CheckJob>,
    inv: Inv,
    seen: Coverage,
}

/// How often the interesting situations came up (to keep the generator honest).
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    command_ok: u32,
    command_err: u32,
    check_changed_table: u32,
    check_ignored: u32,
    ejected: u32,
    down: u32,
    panic: u32,
    closing_with_conns: u32,
    removed_with_conns: u32,
    reload_kept_drained: u32,
    reload_readded_draining: u32,
    retired_pool: u32,
    slow_start: u32,
}

impl Coverage {
    fn observe(&mut self, model: &Model, now: Instant) {
        for p in &model.pools {
            self.retired_pool += u32::from(p.retired);
            self.panic += u32::from(p.panic && !p.retired);
            self.slow_start += u32::from(p.next_slow_start_step.is_some());
            for b in &p.backends {
                let conns = b.shared.stats.conns.current() > 0;
                self.ejected += u32::from(b.outlier.is_ejected(now));
                self.down += u32::from(!b.active.is_up());
                self.removed_with_conns += u32::from(b.remove_when_drained && conns);
            }
        }
    }

    fn missing(&self) -> Vec<&'static str> {
        let all = [
            ("command_ok", self.command_ok),
            ("command_err", self.command_err),
            ("check_changed_table", self.check_changed_table),
            ("check_ignored", self.check_ignored),
            ("ejected", self.ejected),
            ("down", self.down),
            ("panic", self.panic),
            ("closing_with_conns", self.closing_with_conns),
            ("removed_with_conns", self.removed_with_conns),
            ("reload_kept_drained", self.reload_kept_drained),
            ("reload_readded_draining", self.reload_readded_draining),
            ("retired_pool", self.retired_pool),
            ("slow_start", self.slow_start),
        ];
        all.iter().filter(|(_, n)| *n == 0).map(|(s, _)| *s).collect()
    }
}

impl Harness {
    fn new(spec: &ConfigSpec, inv: Inv) -> Harness {
        let now = Instant::now();
        Harness {
            model: Model::new(spec.config(), 1, now, 1).0,
            now,
            last_tick: None,
            pending: Vec::new(),
            inv,
            seen: Coverage::default(),
        }
    }

    /// Backends of live pool `pool` at `addr` that the published table weights (workers pick those).
    fn in_table(&self, pool: u8, addr_ix: u8) -> Vec<Arc<Backend>> {
        let Some(i) = self.model.pool_index(pool_name(pool)) else {
            return Vec::new();
        };
        let s = &self.model.pools[i].published;
        s.backends
            .iter()
            .zip(&s.weights)
            .filter(|(b, w)| **w > 0 && b.addr == addr(addr_ix))
            .map(|(b, _)| b.clone())
            .collect()
    }

    fn tick(&mut self) -> Check {
        let fx = self.model.tick(self.now);
        self.last_tick = Some(self.now);
        if self.inv == Inv::DrainDeadline {
            check_drains_after_tick(&self.model, self.now)?;
        }
        // Workers woken by a close command close what is closing.
        if fx.check_close {
            self.seen.closing_with_conns += 1;
            for p in &self.model.pools {
                for b in &p.backends {
                    if b.shared.closing.load(Ordering::SeqCst) {
                        let open = b.shared.stats.conns.current();
                        b.shared.stats.conns.closed.add(open);
                    }
                }
            }
        }
        Ok(())
    }

    fn command(&mut self, op: &Op) -> Check {
        let before = view(&self.model, self.now);
        let pool = |p: &u8| pool_name(*p);
        let weighted_before = match op {
            Op::Weight { pool, .. } => has_weighted(&self.model, pool_name(*pool)),
            _ => false,
        };
        let now = self.now;
        let m = &mut self.model;
        let reply = |r: Result<(serde_json::Value, ringlb::model::Effects), String>| r.map(|(v, _)| v);
        fn json<T: serde::Serialize>(
            r: ringlb::model::CmdResult<T>,
        ) -> Result<(serde_json::Value, ringlb::model::Effects), String> {
            r.map(|(v, fx)| (serde_json::to_value(v).expect("a reply serializes"), fx))
        }
        let reply = reply(match op {
            Op::Add { pool: p, addr, weight } => {
                json(m.add_backend(pool(p), addr_text(*addr), *weight, forced(*addr), now))
            }
            Op::Remove { pool: p, addr } => json(m.remove_backend(pool(p), addr_text(*addr), forced(*addr), now)),
            Op::Drain { pool: p, addr } => {
                json(m.drain(pool(p), addr_text(*addr), AdminState::Draining, forced(*addr), now))
            }
            Op::Disable { pool: p, addr } => {
                json(m.drain(pool(p), addr_text(*addr), AdminState::Disabled, forced(*addr), now))
            }
            Op::Enable { pool: p, addr } => json(m.enable(pool(p), addr_text(*addr), now)),
            Op::Weight { pool: p, addr, weight } => {
                json(m.set_weight(pool(p), addr_text(*addr), *weight, forced(*addr), now))
            }
            _ => unreachable!(),
        });
        if reply.is_ok() {
            self.seen.command_ok += 1;
        } else {
            self.seen.command_err += 1;
        }
        match self.inv {
            Inv::ErrorChangesNothing => match &reply {
                Ok(v) => ensure!(v.is_object(), "{op:?}: ok reply is not an object: {v}"),
                Err(e) => {
                    ensure!(!e.is_empty(), "{op:?}: empty error");
                    let after = view(&self.model, self.now);
                    ensure!(
                        before == after,
                        "{op:?} failed ({e}) but changed the model:\nbefore {before:#?}\nafter {after:#?}"
                    );
                }
            },
            Inv::WeightKeepsOne => {
                // `--force` is the operator saying "I mean it".
                if let (Op::Weight { pool: p, addr, .. }, Ok(_)) = (op, &reply) {
                    ensure!(
                        forced(*addr) || !weighted_before || has_weighted(&self.model, pool(p)),
                        "{op:?} was accepted and left pool {} with no backend of weight > 0",
                        pool(p)
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Check {
        match op {
            Op::Add { .. }
            | Op::Remove { .. }
            | Op::Drain { .. }
            | Op::Disable { .. }
            | Op::Enable { .. }
            | Op::Weight { .. } => self.command(op)?,
            Op::Reload(spec) => {
                let before = live_backends(&self.model);
                for (i, p) in spec.pools.iter().enumerate() {
                    let (Some(p), Some(pi)) = (p, self.model.pool_index(POOLS[i])) else {
                        continue;
                    };
                    for b in &self.model.pools[pi].backends {
                        if p.backends.iter().any(|(a, _)| addr(*a) == b.config.addr) {
                            if b.remove_when_drained {
                                self.seen.reload_readded_draining += 1;
                            } else if b.admin != AdminState::Enabled {
                                self.seen.reload_kept_drained += 1;
                            }
                        }
                    }
                }
                let _ = self.model.apply_config(spec.config(), self.now);
                if self.inv == Inv::ReloadKeepsState {
                    check_reload(&before, spec, &self.model)?;
                }
            }
            Op::Check { pick, passed } => {
                let jobs = self.model.due_checks(self.now).checks;
                self.pending.extend(jobs);
                if !self.pending.is_empty() {
                    let job = self.pending.remove(*pick as usize % self.pending.len());
                    let detail = match passed {
                        Some(true) => "ok",
                        Some(false) => "connection refused",
                        None => "not run: EMFILE",
                    };
                    let known = self
                        .model
                        .pools
                        .get(job.pool)
                        .is_some_and(|p| p.backends.iter().any(|b| b.epoch == job.epoch));
                    let result = ringlb::model::health::CheckResult {
                        passed: *passed,
                        latency: Duration::from_millis(1),
                        detail: detail.into(),
                    };
                    let changed = self.model.record_check(&job, result, self.now).rebuild_soon;
                    self.seen.check_changed_table += u32::from(changed);
                    self.seen.check_ignored += u32::from(!known);
                }
            }
            Op::Passive { pool, addr, n } => {
                for b in self.in_table(*pool, *addr) {
                    for _ in 0..*n {
                        b.connect_failed();
                    }
                }
                self.tick()?;
            }
            Op::Open { pool, addr } => {
                if let Some(b) = self.in_table(*pool, *addr).first() {
                    b.stats.conns.opened.inc();
                }
            }
            Op::Close { pool, addr } => {
                if let Some(i) = self.model.pool_index(pool_name(*pool)) {
                    if let Some(b) = self.model.pools[i]
                        .backends
                        .iter()
                        .find(|b| b.config.addr == self::addr(*addr) && b.shared.stats.conns.current() > 0)
                    {
                        b.shared.stats.conns.closed.inc();
                    }
                }
            }
            Op::Tick { ms } => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.tick()?;
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Check {
        let now = self.now;
        if matches!(self.inv, Inv::OnlyUsable | Inv::NeverEmpty | Inv::UsableWeighted) && self.model.any_dirty() {
            // Health results only mark their pool; the control plane's
            // ticker rebuilds it within one tick (100 ms), at the latest.
            // The table invariants hold of the tables it publishes then.
            let _ = self.model.rebuild_dirty(now);
        }
        match self.inv {
            Inv::OnlyUsable => check_only_usable(&mut self.model, now),
            Inv::NeverEmpty | Inv::UsableWeighted => check_never_empty(&mut self.model, now, self.inv),
            Inv::OneEntry => check_one_entry(&mut self.model),
            Inv::DrainDeadline => check_closing_only_after_deadline(&self.model, self.last_tick),
            _ => Ok(()),
        }
    }
}

fn run(spec: &ConfigSpec, ops: &[Op], inv: Inv) -> Result<(), TestCaseError> {
    let mut h = Harness::new(spec, inv);
    h.check().map_err(|e| TestCaseError::fail(format!("at start: {e}")))?;
    for (i, op) in ops.iter().enumerate() {
        h.step(op)
            .and_then(|()| h.check())
            .map_err(|e| TestCaseError::fail(format!("after step {i} ({op:?}): {e}")))?;
    }
    Ok(())
}

/// 2,000 cases per property in an optimised build (`cargo test --release`);
/// 400 in the debug build `cargo test` makes, which is ~10x slower per case,
/// so the suite's eight properties still run 3,200 sequences in well under a
/// minute. `PROPTEST_CASES` overrides both.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 400 } else { 2_000 });
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_prop_1_table_holds_only_usable_backends((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::OnlyUsable)?;
    }

    #[test]
    fn model_prop_2_usable_pool_never_publishes_empty_table((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::NeverEmpty)?;
    }

    #[test]
    fn model_prop_2b_usable_backends_have_weight((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::UsableWeighted)?;
    }

    #[test]
    fn model_prop_3_one_entry_per_address((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::OneEntry)?;
    }

    #[test]
    fn model_prop_4_drains_end_by_deadline((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::DrainDeadline)?;
    }

    #[test]
    fn model_prop_5_reload_keeps_operator_states((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::ReloadKeepsState)?;
    }

    #[test]
    fn model_prop_6_failed_command_changes_nothing((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::ErrorChangesNothing)?;
    }

    #[test]
    fn model_prop_7_weight_never_leaves_pool_without_weight((spec, ops) in scenario()) {
        run(&spec, &ops, Inv::WeightKeepsOne)?;
    }
}

/// The generator reaches every situation the invariants are about (checked over
/// a fixed number of generated scenarios, so a change to the generator cannot
/// make the properties above pass vacuously).
#[test]
fn model_prop_0_generator_reaches_interesting_states() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = Coverage::default();
    for _ in 0..500 {
        let (spec, ops) = scenario().new_tree(&mut runner).unwrap().current();
        let mut h = Harness::new(&spec, Inv::Nothing);
        for op in &ops {
            h.step(op).unwrap();
            h.seen.observe(&h.model, h.now);
        }
        let c = h.seen;
        macro_rules! sum {
            ($($f:ident),*) => { $(seen.$f += c.$f;)* };
        }
        sum!(
            command_ok,
            command_err,
            check_changed_table,
            check_ignored,
            ejected,
            down,
            panic,
            closing_with_conns,
            removed_with_conns,
            reload_kept_drained,
            reload_readded_draining,
            retired_pool,
            slow_start
        );
    }
    assert!(
        seen.missing().is_empty(),
        "never reached: {:?} ({seen:?})",
        seen.missing()
    );
}

// === the specific bugs, as concrete sequences ===

const TWO_BACKENDS: &str = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:10000\"\npool = \"a\"\n\n\
    [[pool]]\nname = \"a\"\ntable_size = 13\ndrain_timeout = \"1s\"\n\
    [[pool.backend]]\naddr = \"10.0.0.1:80\"\n[[pool.backend]]\naddr = \"10.0.0.2:80\"\n";

const ONE_BACKEND: &str = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:10000\"\npool = \"a\"\n\n\
    [[pool]]\nname = \"a\"\ntable_size = 13\ndrain_timeout = \"1s\"\n\
    [[pool.backend]]\naddr = \"10.0.0.1:80\"\n";

fn parse(text: &str) -> Config {
    Config::parse(text, Path::new("t.toml")).unwrap()
}

/// Pool "a"'s entries for `addr`, and the published table's weight of each.
fn entries(model: &mut Model, addr: &str) -> Vec<(AdminState, bool, u32)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let snap = model.snapshot();
    let i = model.pool_index("a").unwrap();
    model.pools[i]
        .backends
        .iter()
        .filter(|b| b.config.addr == addr)
        .map(|b| {
            let w = snapshot_index(&snap.pools[i], &b.shared).map_or(0, |j| snap.pools[i].weights[j]);
            (b.admin, b.shared.closing.load(Ordering::SeqCst), w)
        })
        .collect()
}

fn table_is_some(model: &mut Model) -> bool {
    let i = model.pool_index("a").unwrap();
    model.snapshot().pools[i].table.is_some()
}

fn open_conn(model: &Model, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let i = model.pool_index("a").unwrap();
    let b = model.pools[i].backends.iter().find(|b| b.config.addr == addr).unwrap();
    b.shared.stats.conns.opened.inc();
}

#[test]
fn readded_draining_backend_takes_over_its_entry() {
    let t0 = Instant::now();
    let mut m = Model::new(parse(TWO_BACKENDS), 1, t0, 1).0;
    open_conn(&m, "10.0.0.2:80"); // keeps it in the pool while it drains
    let _ = m.remove_backend("a", "10.0.0.2:80", false, t0).unwrap();
    let _ = m.tick(t0 + Duration::from_millis(100));
    let _ = m
        .add_backend("a", "10.0.0.2:80", None, false, t0 + Duration::from_millis(200))
        .unwrap();
    let e = entries(&mut m, "10.0.0.2:80");
    assert_eq!(e.len(), 1, "one entry for 10.0.0.2:80, got {e:?}");
    assert_eq!(e[0].0, AdminState::Enabled);
    assert!(e[0].2 > 0, "re-added backend is in the table: {e:?}");
    assert!(table_is_some(&mut m), "two usable backends but no table");
}

#[test]
fn reload_without_then_with_draining_backend_keeps_one_entry_and_a_table() {
    let t0 = Instant::now();
    let mut m = Model::new(parse(TWO_BACKENDS), 1, t0, 1).0;
    open_conn(&m, "10.0.0.2:80");
    let _ = m.apply_config(parse(ONE_BACKEND), t0);
    let _ = m.tick(t0 + Duration::from_millis(100));
    assert_eq!(entries(&mut m, "10.0.0.2:80").len(), 1, "B drains with its connection");
    let _ = m.apply_config(parse(TWO_BACKENDS), t0 + Duration::from_millis(200));
    let e = entries(&mut m, "10.0.0.2:80");
    assert_eq!(e.len(), 1, "one entry for 10.0.0.2:80, got {e:?}");
    assert_eq!(e[0].0, AdminState::Enabled);
    assert!(e[0].2 > 0, "re-added backend is in the table: {e:?}");
    assert!(table_is_some(&mut m), "two usable backends but no table");
}

#[test]
fn readded_backend_after_its_drain_deadline_is_not_closing() {
    let t0 = Instant::now();
    let mut m = Model::new(parse(TWO_BACKENDS), 1, t0, 1).0;
    open_conn(&m, "10.0.0.2:80");
    let _ = m.remove_backend("a", "10.0.0.2:80", false, t0).unwrap();
    let _ = m.tick(t0 + Duration::from_secs(2)); // past drain_timeout: closing, connection not closed yet
    let _ = m
        .add_backend("a", "10.0.0.2:80", None, false, t0 + Duration::from_secs(2))
        .unwrap();
    let e = entries(&mut m, "10.0.0.2:80");
    assert_eq!(e.len(), 1, "one entry for 10.0.0.2:80, got {e:?}");
    assert_eq!(
        (e[0].0, e[0].1),
        (AdminState::Enabled, false),
        "enabled and not closing: {e:?}"
    );
    assert!(e[0].2 > 0, "re-added backend is in the table: {e:?}");
    assert!(table_is_some(&mut m));
}

#[test]
fn weight_zero_on_every_backend_is_refused() {
    let t0 = Instant::now();
    let mut m = Model::new(parse(TWO_BACKENDS), 1, t0, 1).0;
    let _ = m.set_weight("a", "10.0.0.1:80", 0, false, t0).unwrap();
    assert!(table_is_some(&mut m));
    let r = m.set_weight("a", "10.0.0.2:80", 0, false, t0);
    assert!(r.is_err(), "the last weighted backend's weight 0 is refused, got {r:?}");
    let e = entries(&mut m, "10.0.0.2:80");
    assert!(e.len() == 1 && e[0].2 > 0, "10.0.0.2:80 keeps its weight: {e:?}");
    assert!(table_is_some(&mut m), "a usable backend but no table");
}
