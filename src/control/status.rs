//! The status page's data model (`/status.json`): listeners, pools and backends with
//! their shares of the Maglev tables, computed from the model and the counters, and
//! rates from two samples.
//!
//! Collecting reads the model under its lock (the control thread's own data, never a
//! worker's); the rates are a pure function of two collections and the time between
//! them ([`Status::fill_rates`]), so they are tested without a clock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::Model;
use crate::stats::RefuseReason;

/// Rates are computed over at least this long (and at most about twice it), however
/// often the page is polled and by how many viewers.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Everything the page shows, for one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// ringlb's version.
    pub version: &'static str,
    /// Seconds since ringlb started.
    pub uptime_seconds: f64,
    /// Successful config loads.
    pub config_generation: u64,
    /// Routing snapshots published.
    pub snapshot_generation: u64,
    /// Worker threads.
    pub workers: usize,
    /// Seconds between the two samples the rates come from (`None`: no rates yet).
    pub rate_window_seconds: Option<f64>,
    /// Listeners in config order.
    pub listeners: Vec<ListenerStatus>,
    /// Pools in config order.
    pub pools: Vec<PoolStatus>,
}

/// One listener.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    /// Its name.
    pub name: String,
    /// Its address.
    pub bind: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The pool it sends to.
    pub pool: String,
    /// Connections (UDP: flows) open now.
    pub active: u64,
    /// `max_connections` (0 = no limit).
    pub max_connections: u64,
    /// Connections (flows) accepted since start.
    pub accepted: u64,
    /// Refusals since start, by reason (every reason, zeros included).
    pub refused: BTreeMap<&'static str, u64>,
    /// Bytes from clients.
    pub bytes_in: u64,
    /// Bytes to clients.
    pub bytes_out: u64,
    /// Per-second rates over the last window.
    pub rates: Option<ListenerRates>,
}

/// A listener's rates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListenerRates {
    /// Accepted per second.
    pub accepted: f64,
    /// Refused per second, by reason; only the reasons with refusals in the window.
    pub refused: BTreeMap<&'static str, f64>,
    /// Bytes per second from clients.
    pub bytes_in: f64,
    /// Bytes per second to clients.
    pub bytes_out: f64,
}

/// One pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Its name.
    pub name: String,
    /// Generation of its table (increases on every rebuild).
    pub table_generation: u64,
    /// Slots of its table.
    pub table_size: usize,
    /// XXH3 digest of the table's slots (as hex): two instances with the same
    /// fingerprint send every client to the same backend.
    pub fingerprint: Option<String>,
    /// In panic mode (the table spans every enabled backend, healthy or not).
    pub panic: bool,
    /// How long the last build took, in microseconds.
    pub table_build_us: u64,
    /// Its backends, in configured order.
    pub backends: Vec<BackendStatus>,
    /// Geo pools: one entry per distinct client-region table.
    pub regions: Vec<RegionTable>,
}

/// One backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// Its address.
    pub addr: SocketAddr,
    /// Its region (geo pools).
    pub region: Option<String>,
    /// Configured weight.
    pub weight: u32,
    /// `active`, `draining`, `disabled`, `down` or `ejected`.
    pub state: &'static str,
    /// `primary` or `backup`.
    pub tier: &'static str,
    /// Why it last changed state.
    pub reason: String,
    /// Share of the pool's table slots it owns, 0..=1 (geo pools: of the default
    /// region's table; `regions` has the others).
    pub share: f64,
    /// Open connections.
    pub active: u64,
    /// `max_connections` (0 = no limit).
    pub max_connections: u64,
    /// Connections made since start.
    pub connections: u64,
    /// Bytes sent to it.
    pub bytes_in: u64,
    /// Bytes received from it.
    pub bytes_out: u64,
    /// Failed or timed-out connects.
    pub failures: u64,
    /// Passive-check ejections.
    pub ejections: u64,
    /// The last active check, if any ran.
    pub last_check: Option<LastCheck>,
    /// Leaves the pool once drained.
    pub removing: bool,
    /// Per-second rates over the last window.
    pub rates: Option<BackendRates>,
}

/// A backend's rates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendRates {
    /// New connections per second.
    pub connections: f64,
    /// Bytes per second sent to it.
    pub bytes_in: f64,
    /// Bytes per second received from it.
    pub bytes_out: f64,
    /// Connect failures per second.
    pub failures: f64,
}

/// The last active check of a backend.
#[derive(Debug, Clone, Serialize)]
pub struct LastCheck {
    /// Passed, failed, or `None`: could not run inside ringlb (the state was kept).
    pub ok: Option<bool>,
    /// How long it took, in milliseconds.
    pub ms: f64,
    /// What it found.
    pub detail: String,
}

/// One distinct table of a geo pool and the client regions that use it.
#[derive(Debug, Clone, Serialize)]
pub struct RegionTable {
    /// Client regions served by this table.
    pub client_regions: Vec<String>,
    /// Share of this table per backend, in the pool's backend order.
    pub shares: Vec<f64>,
    /// `false` when no backend is usable for these regions.
    pub usable: bool,
}

/// Slot shares of `table` over `backends` entries (0 everywhere when there is none).
fn shares(table: Option<&crate::maglev::MaglevTable>, backends: usize) -> Vec<f64> {
    match table {
        None => vec![0.0; backends],
        Some(t) => {
            let size = t.size().max(1) as f64;
            let mut counts = t.slot_counts(backends);
            counts.truncate(backends);
            // Rounded so the JSON shows 0.25, not 0.24999618.
            counts.iter().map(|&c| (c as f64 / size * 1e4).round() / 1e4).collect()
        }
    }
}

/// Share of the table slots each backend of `pool` owns (a geo pool's: of the default
/// region's table), by address.
pub fn table_shares(pool: &crate::snapshot::PoolSnapshot) -> HashMap<SocketAddr, f64> {
    let s = shares(default_table(pool), pool.backends.len());
    pool.backends.iter().zip(s).map(|(b, f)| (b.addr, f)).collect()
}

/// The table of a plain pool, or a geo pool's table for the default client region.
fn default_table(pool: &crate::snapshot::PoolSnapshot) -> Option<&crate::maglev::MaglevTable> {
    match &pool.geo {
        None => pool.table.as_ref(),
        Some(g) => g
            .by_region
            .get(usize::from(crate::geo::RegionNames::DEFAULT.0))
            .and_then(|&t| g.tables.get(usize::from(t)))
            .and_then(Option::as_ref),
    }
}

/// Per second, for a counter that went from `before` to `now` in `secs`, rounded to
/// 0.01; never negative (a counter that went back, e.g. a backend that left and came
/// back, reads as 0).
pub fn per_sec(before: u64, now: u64, secs: f64) -> f64 {
    let r = now.saturating_sub(before) as f64 / secs;
    (r * 100.0).round() / 100.0
}

// === impl Status ===

impl Status {
    /// Collects the status from the model (call with the model locked).
    pub fn collect(model: &Model, workers: usize, uptime: Duration, now: Instant) -> Status {
        let listeners = model
            .listeners
            .iter()
            .filter(|l| l.retire_deadline.is_none())
            .map(|l| ListenerStatus {
                name: l.config.name.clone(),
                bind: l.config.bind,
                protocol: match l.config.protocol {
                    crate::config::Protocol::Tcp => "tcp",
                    crate::config::Protocol::Udp => "udp",
                },
                pool: l.config.pool.clone(),
                active: l.stats.active.current(),
                max_connections: l.config.max_connections,
                accepted: l.stats.accepted.get(),
                refused: RefuseReason::ALL
                    .iter()
                    .map(|r| (r.label(), l.stats.refused[*r as usize].get()))
                    .collect(),
                bytes_in: l.stats.bytes_in.get(),
                bytes_out: l.stats.bytes_out.get(),
                rates: None,
            })
            .collect();
        let names = &model.config.geo.names;
        let pools = model
            .pools
            .iter()
            .filter(|p| !p.retired)
            .map(|p| {
                let published = &p.published;
                // The table indexes the published backends; the model's list may be
                // ahead of it (a command not yet rebuilt), so match by address.
                let index: HashMap<SocketAddr, usize> = published
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.addr, i))
                    .collect();
                let n = published.backends.len();
                let default_table = default_table(published);
                let main_shares = shares(default_table, n);
                let regions = published
                    .geo
                    .as_ref()
                    .map(|g| {
                        let mut by_table: BTreeMap<u16, Vec<String>> = BTreeMap::new();
                        for (id, name) in g.names.iter() {
                            if let Some(&t) = g.by_region.get(usize::from(id.0)) {
                                by_table.entry(t).or_default().push(name.to_string());
                            }
                        }
                        by_table
                            .into_iter()
                            .map(|(t, client_regions)| {
                                let table = g.tables.get(usize::from(t)).and_then(Option::as_ref);
                                let raw = shares(table, n);
                                RegionTable {
                                    client_regions,
                                    // In the pool's backend order, like `backends`.
                                    shares: p
                                        .backends
                                        .iter()
                                        .map(|b| index.get(&b.config.addr).map_or(0.0, |&i| raw[i]))
                                        .collect(),
                                    usable: table.is_some(),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                PoolStatus {
                    name: p.config.name.clone(),
                    table_generation: published.generation,
                    table_size: p.config.table_size,
                    fingerprint: default_table.map(|t| format!("{:016x}", t.digest())),
                    panic: p.panic,
                    table_build_us: published.build_time.as_micros() as u64,
                    backends: p
                        .backends
                        .iter()
                        .map(|b| BackendStatus {
                            addr: b.config.addr,
                            region: b.config.region.and_then(|r| names.name(r)).map(str::to_string),
                            weight: b.config.weight,
                            state: b.state_label(now),
                            tier: if b.config.backup { "backup" } else { "primary" },
                            reason: b.reason.clone(),
                            share: index.get(&b.config.addr).map_or(0.0, |&i| main_shares[i]),
                            active: b.shared.stats.conns.current(),
                            max_connections: b.config.max_connections,
                            connections: b.shared.stats.conns.opened.get(),
                            bytes_in: b.shared.stats.bytes_in.get(),
                            bytes_out: b.shared.stats.bytes_out.get(),
                            failures: b.shared.stats.connect_failures.get(),
                            ejections: b.outlier.ejections_total(),
                            last_check: b.last_check.as_ref().map(|(ok, lat, detail)| LastCheck {
                                ok: *ok,
                                ms: (lat.as_secs_f64() * 1e5).round() / 100.0,
                                detail: detail.clone(),
                            }),
                            removing: b.remove_when_drained,
                            rates: None,
                        })
                        .collect(),
                    regions,
                }
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: (uptime.as_secs_f64() * 10.0).round() / 10.0,
            config_generation: model.config_generation,
            snapshot_generation: model.generation(),
            workers,
            rate_window_seconds: None,
            listeners,
            pools,
        }
    }

    /// Fills in the rates of `self` against `before`, taken `secs` seconds earlier.
    /// Listeners match by name, backends by pool and address; one that was not there
    /// before gets no rates.
    pub fn fill_rates(&mut self, before: &Status, secs: f64) {
        if secs <= 0.0 {
            return;
        }
        self.rate_window_seconds = Some((secs * 1000.0).round() / 1000.0);
        let old_listeners: HashMap<&str, &ListenerStatus> =
            before.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        for l in &mut self.listeners {
            let Some(o) = old_listeners.get(l.name.as_str()) else {
                continue;
            };
            l.rates = Some(ListenerRates {
                accepted: per_sec(o.accepted, l.accepted, secs),
                refused: l
                    .refused
                    .iter()
                    .filter_map(|(k, &v)| {
                        let r = per_sec(o.refused.get(k).copied().unwrap_or(0), v, secs);
                        (r > 0.0).then_some((*k, r))
                    })
                    .collect(),
                bytes_in: per_sec(o.bytes_in, l.bytes_in, secs),
                bytes_out: per_sec(o.bytes_out, l.bytes_out, secs),
            });
        }
        let old_backends: HashMap<(&str, SocketAddr), &BackendStatus> = before
            .pools
            .iter()
            .flat_map(|p| p.backends.iter().map(move |b| ((p.name.as_str(), b.addr), b)))
            .collect();
        for p in &mut self.pools {
            for b in &mut p.backends {
                let Some(o) = old_backends.get(&(p.name.as_str(), b.addr)) else {
                    continue;
                };
                b.rates = Some(BackendRates {
                    connections: per_sec(o.connections, b.connections, secs),
                    bytes_in: per_sec(o.bytes_in, b.bytes_in, secs),
                    bytes_out: per_sec(o.bytes_out, b.bytes_out, secs),
                    failures: per_sec(o.failures, b.failures, secs),
                });
            }
        }
    }
}

/// Keeps the samples the rates come from: the newest collection at least
/// [`RATE_WINDOW`] old is the base, so any number of viewers polling at any pace see
/// rates over one to two windows, and nothing is sampled while nobody looks.
#[derive(Debug, Default)]
pub struct Sampler {
    /// The base of the rates.
    older: Option<(Instant, Status)>,
    /// The newest kept sample; becomes the base once it is a window old.
    newer: Option<(Instant, Status)>,
}

// === impl Sampler ===

impl Sampler {
    /// Adds `cur`, taken at `now`, and fills its rates from the kept samples.
    pub fn observe(&mut self, mut cur: Status, now: Instant) -> Status {
        let window_old = |s: &Option<(Instant, Status)>| {
            s.as_ref()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RATE_WINDOW)
        };
        if self.newer.is_none() || window_old(&self.newer) {
            // Keep the older one while it is the only one a window old.
            if window_old(&self.newer) {
                self.older = self.newer.take();
            }
            self.newer = Some((now, cur.clone()));
        }
        let base = self.older.as_ref().or(self.newer.as_ref().filter(|(at, _)| *at < now));
        if let Some((at, before)) = base {
            cur.fill_rates(before, now.saturating_duration_since(*at).as_secs_f64());
        }
        cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(accepted: u64, refused_rate_limited: u64, conns: u64) -> Status {
        let refused = RefuseReason::ALL
            .iter()
            .map(|r| {
                (
                    r.label(),
                    if *r == RefuseReason::RateLimited {
                        refused_rate_limited
                    } else {
                        0
                    },
                )
            })
            .collect();
        Status {
            version: "t",
            uptime_seconds: 0.0,
            config_generation: 1,
            snapshot_generation: 1,
            workers: 1,
            rate_window_seconds: None,
            listeners: vec![ListenerStatus {
                name: "web".into(),
                bind: "127.0.0.1:1".parse().unwrap(),
                protocol: "tcp",
                pool: "web".into(),
                active: 0,
                max_connections: 0,
                accepted,
                refused,
                bytes_in: accepted * 10,
                bytes_out: 0,
                rates: None,
            }],
            pools: vec![PoolStatus {
                name: "web".into(),
                table_generation: 1,
                table_size: 7,
                fingerprint: None,
                panic: false,
                table_build_us: 0,
                backends: vec![BackendStatus {
                    addr: "127.0.0.1:2".parse().unwrap(),
                    region: None,
                    weight: 1,
                    state: "active",
                    tier: "primary",
                    reason: String::new(),
                    share: 1.0,
                    active: 0,
                    max_connections: 0,
                    connections: conns,
                    bytes_in: 0,
                    bytes_out: 0,
                    failures: 0,
                    ejections: 0,
                    last_check: None,
                    removing: false,
                    rates: None,
                }],
                regions: vec![],
            }],
        }
    }

    #[test]
    fn rates_are_differences_per_second() {
        let mut now = status(300, 20, 250);
        now.fill_rates(&status(100, 10, 50), 2.0);
        let l = now.listeners[0].rates.as_ref().unwrap();
        assert_eq!(l.accepted, 100.0);
        assert_eq!(l.bytes_in, 1000.0);
        assert_eq!(l.refused.get("rate_limited"), Some(&5.0));
        assert_eq!(l.refused.len(), 1, "reasons without refusals are left out");
        assert_eq!(now.pools[0].backends[0].rates.as_ref().unwrap().connections, 100.0);
        assert_eq!(now.rate_window_seconds, Some(2.0));
    }

    #[test]
    fn a_counter_that_went_back_reads_zero_and_newcomers_get_no_rates() {
        let mut before = status(100, 0, 50);
        before.pools[0].backends[0].addr = "127.0.0.1:3".parse().unwrap();
        let mut now = status(10, 0, 5);
        now.fill_rates(&before, 1.0);
        assert_eq!(now.listeners[0].rates.as_ref().unwrap().accepted, 0.0);
        assert!(now.pools[0].backends[0].rates.is_none());
    }

    #[test]
    fn sampler_rates_span_at_least_a_window_however_often_it_is_polled() {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        let first = s.observe(status(0, 0, 0), t0);
        assert!(first.listeners[0].rates.is_none(), "one sample gives no rate");
        // Polled every 100 ms at 100 connections a second.
        let mut last = first;
        for i in 1..=30u64 {
            let at = t0 + Duration::from_millis(100 * i);
            last = s.observe(status(10 * i, 0, 10 * i), at);
            let w = last.rate_window_seconds.unwrap();
            if i >= 10 {
                assert!((1.0..=2.0).contains(&w), "poll {i}: window {w}");
            }
            assert_eq!(last.listeners[0].rates.as_ref().unwrap().accepted, 100.0, "poll {i}");
        }
        assert!(last.rate_window_seconds.unwrap() >= 1.0);
    }
}
