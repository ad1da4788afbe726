//! A synthetic-time world around one `Model`: the shell in miniature. It
//! carries out effects the way `Server::apply` does (publish = take
//! `Model::snapshot`, logs collected, listeners started/stopped recorded,
//! checks queued) and plays the data plane's part by writing the shared
//! counters workers would write. Time is `t0 + offset`; nothing sleeps.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::model::health::CheckResult;
use crate::model::{CheckJob, Effects, LogLine, Model};
use crate::protocol::{Reply, Request};
use crate::snapshot::Snapshot;

/// The model plus what its shell would have seen.
pub struct World {
    pub model: Model,
    pub t0: Instant,
    pub now: Instant,
    /// The snapshot last published (what workers would load).
    pub published: Arc<Snapshot>,
    /// Publishes so far.
    pub publishes: u32,
    /// Close checks sent to workers so far.
    pub close_checks: u32,
    /// Every log line, in order.
    pub logs: Vec<LogLine>,
    /// Listener slots started, with their names.
    pub started: Vec<(usize, String)>,
    /// Listener slots stopped.
    pub stopped: Vec<usize>,
    /// Checks handed out and not yet answered.
    pub checks: Vec<CheckJob>,
}

/// Table size of the test pools (prime).
pub const TABLE: usize = 1021;

/// `addr` as a socket address.
pub fn sa(addr: &str) -> SocketAddr {
    addr.parse().expect("test address")
}

/// A config from TOML text (panics on an invalid one: tests write valid files).
pub fn config(text: &str) -> Config {
    Config::parse(text, std::path::Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// A config with one TCP listener `l` on pool `p`, `pool_extra` lines in the
/// pool, and `backends` (address, extra lines). Tables are small
/// ([`TABLE`] slots) so that hundreds of rebuilds stay fast in debug builds.
pub fn one_pool(pool_extra: &str, backends: &[(&str, &str)]) -> String {
    let mut text = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1000\"\npool = \"p\"\n\n[[pool]]\nname = \"p\"\ntable_size = {TABLE}\n{pool_extra}\n"
    );
    for (addr, extra) in backends {
        text.push_str(&format!("[[pool.backend]]\naddr = \"{addr}\"\n{extra}\n"));
    }
    text
}

impl World {
    /// A world running `text`, its first effects applied.
    pub fn new(text: &str) -> World {
        let t0 = Instant::now();
        let (model, fx) = Model::new(config(text), 1, t0, 42);
        let mut w = World {
            model,
            t0,
            now: t0,
            published: Arc::new(Snapshot::default()),
            publishes: 0,
            close_checks: 0,
            logs: Vec::new(),
            started: Vec::new(),
            stopped: Vec::new(),
            checks: Vec::new(),
        };
        w.apply(fx);
        w
    }

    /// Carries out `fx` as the control plane's shell does.
    pub fn apply(&mut self, fx: Effects) {
        self.logs.extend(fx.logs);
        self.stopped.extend(fx.stop_listeners);
        self.started
            .extend(fx.start_listeners.iter().map(|l| (l.slot, l.config.name.clone())));
        if fx.publish {
            self.published = Arc::new(self.model.snapshot());
            self.publishes += 1;
        }
        self.close_checks += u32::from(fx.check_close);
        self.checks.extend(fx.checks);
    }

    /// Moves time on by `ms` and runs the tick (periodic work + dirty rebuilds).
    pub fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        let fx = self.model.tick(self.now);
        self.apply(fx);
    }

    /// Advances `ms` in 100 ms ticks, as the control plane's ticker would.
    pub fn run_for(&mut self, ms: u64) {
        for _ in 0..ms / 100 {
            self.advance(100);
        }
        if ms % 100 > 0 {
            self.advance(ms % 100);
        }
    }

    /// A control request as `control::handle` carries it out: the model's
    /// reply, dirty pools rebuilt into the same publish when it succeeded.
    pub fn ctl(&mut self, req: Request) -> Reply<'static> {
        let (reply, mut fx) = self.model.command(&req, self.now).expect("a changing verb");
        if reply.is_ok() {
            fx.merge(self.model.rebuild_dirty(self.now));
        } else {
            assert!(
                !fx.publish && fx.logs.is_empty(),
                "a refused command asked for effects: {fx:?}"
            );
        }
        self.apply(fx);
        reply
    }

    /// Reloads `text` as `Server::reload` does once the file is read and
    /// its new listeners bound.
    pub fn reload(&mut self, text: &str) -> Result<crate::protocol::ReloadReply, String> {
        let (reply, fx) = self.model.reload(config(text), self.now)?;
        self.apply(fx);
        Ok(reply)
    }

    /// Asks for due checks; returns how many were handed out.
    pub fn due(&mut self) -> usize {
        let fx = self.model.due_checks(self.now);
        let n = fx.checks.len();
        self.apply(fx);
        n
    }

    /// Answers the queued check of `addr` with `passed`.
    pub fn answer(&mut self, addr: &str, passed: Option<bool>) -> Effects {
        let detail = match passed {
            Some(true) => "ok",
            Some(false) => "connection refused",
            None => "not run: EMFILE",
        };
        self.answer_with(addr, passed, detail)
    }

    /// Answers the queued check of `addr` with `passed` and what it saw.
    pub fn answer_with(&mut self, addr: &str, passed: Option<bool>, detail: &str) -> Effects {
        let i = self
            .checks
            .iter()
            .position(|j| j.target == sa(addr))
            .unwrap_or_else(|| panic!("no check of {addr} queued: {:?}", self.checks));
        let job = self.checks.remove(i);
        let result = CheckResult {
            passed,
            latency: Duration::from_millis(1),
            detail: detail.into(),
        };
        self.model.record_check(&job, result, self.now)
    }

    /// Every check due now answered `passed` for the backends in `addrs`,
    /// the others passed; then the ticker's rebuild.
    pub fn check_round(&mut self, failing: &[&str]) {
        self.due();
        let jobs: Vec<SocketAddr> = self.checks.iter().map(|j| j.target).collect();
        for target in jobs {
            let ok = !failing.iter().any(|f| sa(f) == target);
            let fx = self.answer(&target.to_string(), Some(ok));
            self.apply(fx);
        }
        let fx = self.model.rebuild_dirty(self.now);
        self.apply(fx);
    }

    /// The workers' part: `n` failed connects to `addr` in pool `pool`.
    pub fn connect_failures(&self, pool: &str, addr: &str, n: u32) {
        for _ in 0..n {
            self.backend(pool, addr).shared.connect_failed();
        }
    }

    /// The workers' part: `n` connections to `addr` opened.
    pub fn open(&self, pool: &str, addr: &str, n: u64) {
        self.backend(pool, addr).shared.stats.conns.opened.add(n);
    }

    /// The workers' part: every connection to `addr` closed.
    pub fn close_all(&self, pool: &str, addr: &str) {
        let b = self.backend(pool, addr);
        b.shared.stats.conns.closed.add(b.open_connections());
    }

    /// The model's live entry for `addr` in `pool` (leaving ones included).
    pub fn backend(&self, pool: &str, addr: &str) -> &crate::model::BackendState {
        let p = self.model.pool_index(pool).unwrap_or_else(|| panic!("no pool {pool}"));
        self.model.pools[p]
            .backends
            .iter()
            .find(|b| b.config.addr == sa(addr))
            .unwrap_or_else(|| panic!("pool {pool} has no {addr}"))
    }

    /// The state label of `addr` in `pool`.
    pub fn state(&self, pool: &str, addr: &str) -> &'static str {
        self.backend(pool, addr).state_label(self.now)
    }

    /// Whether the published snapshot's pool `pool` lists `addr`.
    pub fn listed(&self, pool: &str, addr: &str) -> bool {
        self.published_pool(pool).backends.iter().any(|b| b.addr == sa(addr))
    }

    /// The published pool named `pool`.
    pub fn published_pool(&self, pool: &str) -> &crate::snapshot::PoolSnapshot {
        self.published
            .pools
            .iter()
            .find(|p| p.name == pool)
            .unwrap_or_else(|| panic!("pool {pool} not published"))
    }

    /// The published table weights of pool `pool`, by address (0: not in it).
    pub fn weights(&self, pool: &str) -> Vec<(SocketAddr, u32)> {
        let p = self.published_pool(pool);
        p.backends
            .iter()
            .map(|b| b.addr)
            .zip(p.weights.iter().copied())
            .collect()
    }

    /// The addresses the published table of `pool` holds (weight > 0), and
    /// whether it has a table at all.
    pub fn in_table(&self, pool: &str) -> Vec<SocketAddr> {
        let p = self.published_pool(pool);
        if p.table.is_none() {
            return Vec::new();
        }
        self.weights(pool)
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(a, _)| a)
            .collect()
    }

    /// The published weight of `addr` in `pool`'s table.
    pub fn weight_of(&self, pool: &str, addr: &str) -> u32 {
        self.weights(pool)
            .into_iter()
            .find(|(a, _)| *a == sa(addr))
            .map_or(0, |(_, w)| w)
    }

    /// Backends a client at `ip` can land on in a geo pool (weight > 0 in
    /// the table its region uses).
    pub fn geo_targets(&self, pool: &str, ip: &str) -> Vec<SocketAddr> {
        let p = self.published_pool(pool);
        let ip: IpAddr = ip.parse().expect("test ip");
        let (table, region) = p.table_for(ip);
        let g = p.geo.as_ref().expect("a geo pool");
        let region = region.expect("geo pools resolve a region");
        if table.is_none() {
            return Vec::new();
        }
        let weights = &g.weights[g.by_region[region.0 as usize] as usize];
        p.backends
            .iter()
            .zip(weights)
            .filter(|(_, w)| **w > 0)
            .map(|(b, _)| b.addr)
            .collect()
    }

    /// The published listener names (slots in the snapshot).
    pub fn published_listeners(&self) -> Vec<String> {
        self.published
            .listeners
            .iter()
            .flatten()
            .map(|l| l.config.name.clone())
            .collect()
    }

    /// Whether `addr`'s connections are told to close (workers read this).
    pub fn closing(&self, pool: &str, addr: &str) -> bool {
        self.backend(pool, addr).shared.closing.load(Ordering::SeqCst)
    }

    /// Whether some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs.iter().any(|l| l.text.contains(needle))
    }
}

/// `drain` request.
pub fn drain(pool: &str, addr: &str) -> Request {
    Request::Drain {
        pool: pool.into(),
        addr: addr.into(),
        force: false,
    }
}

/// `disable` request.
pub fn disable(pool: &str, addr: &str) -> Request {
    Request::Disable {
        pool: pool.into(),
        addr: addr.into(),
        force: false,
    }
}

/// `enable` request.
pub fn enable(pool: &str, addr: &str) -> Request {
    Request::Enable {
        pool: pool.into(),
        addr: addr.into(),
    }
}

/// `remove` request.
pub fn remove(pool: &str, addr: &str) -> Request {
    Request::Remove {
        pool: pool.into(),
        addr: addr.into(),
        force: false,
    }
}

/// `add` request.
pub fn add(pool: &str, addr: &str, weight: Option<i64>) -> Request {
    Request::Add {
        pool: pool.into(),
        addr: addr.into(),
        weight,
        force: false,
    }
}

/// `weight` request.
pub fn weight(pool: &str, addr: &str, w: i64) -> Request {
    Request::Weight {
        pool: pool.into(),
        addr: addr.into(),
        weight: w,
        force: false,
    }
}
