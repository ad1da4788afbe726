//! Per-worker counters: each worker writes its own cache line, readers sum.
//!
//! A worker never writes a line another worker writes, so counting costs one
//! uncontended atomic add on the hot path.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::utils::CachePadded;

thread_local! {
    static WORKER_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Marks the current thread as worker `id` (called once when a worker starts).
pub fn set_worker_slot(id: usize) {
    WORKER_SLOT.with(|s| s.set(id));
}

fn slot(len: usize) -> usize {
    // Threads that are not workers (control plane, tests) share the last slot.
    let id = WORKER_SLOT.with(|s| s.get());
    if id < len - 1 {
        id
    } else {
        len - 1
    }
}

/// A monotonic counter sharded by worker.
pub struct Counter {
    shards: Box<[CachePadded<AtomicU64>]>,
}

impl Counter {
    /// A counter with one shard per worker plus one shared shard.
    pub fn new(workers: usize) -> Self {
        Counter {
            shards: (0..=workers).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
        }
    }

    /// Adds `n` on the calling worker's shard.
    #[inline]
    pub fn add(&self, n: u64) {
        self.shards[slot(self.shards.len())].fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The total over all shards.
    pub fn get(&self) -> u64 {
        self.shards.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    /// What worker `id` added (its own shard). Threads that are not workers
    /// add to a shared shard that no worker id reads; an id past the
    /// workers reads 0.
    pub fn worker(&self, id: usize) -> u64 {
        match self.shards.get(id) {
            Some(s) if id + 1 < self.shards.len() => s.load(Ordering::Relaxed),
            _ => 0,
        }
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// A gauge kept as two monotonic counters (opened, closed): no shard ever goes
/// negative and the sum is exact once both are read.
#[derive(Debug)]
pub struct Gauge {
    /// Times the gauge went up.
    pub opened: Counter,
    /// Times it went down.
    pub closed: Counter,
}

impl Gauge {
    /// A gauge for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Gauge {
            opened: Counter::new(workers),
            closed: Counter::new(workers),
        }
    }

    /// Current value (never negative; read closed first so a racing open can
    /// only make it look higher, not wrap).
    pub fn current(&self) -> u64 {
        let closed = self.closed.get();
        self.opened.get().saturating_sub(closed)
    }
}

/// Upper bounds (seconds) of the connect-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

/// A latency histogram with fixed buckets, sharded by worker like [`Counter`].
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; the last is +Inf).
    pub buckets: Box<[Counter]>,
    /// Sum of observations in microseconds.
    pub sum_micros: Counter,
}

impl Histogram {
    /// An empty histogram.
    pub fn new(workers: usize) -> Self {
        Histogram {
            buckets: (0..=LATENCY_BUCKETS.len()).map(|_| Counter::new(workers)).collect(),
            sum_micros: Counter::new(workers),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].inc();
        self.sum_micros.add(d.as_micros() as u64);
    }

    /// Cumulative counts per bucket (Prometheus `le` semantics), ending with +Inf.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.buckets
            .iter()
            .map(|b| {
                total += b.get();
                total
            })
            .collect()
    }
}

/// Why a client (TCP connection, or UDP datagram/flow) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// No usable backend in the pool.
    NoBackend,
    /// Every candidate backend failed to connect.
    ConnectFailed,
    /// The source's token bucket is empty.
    RateLimited,
    /// The source table is full and the overflow sketch that judges the sources it
    /// cannot hold refused: the source is over its rate, or shares every sketch bucket
    /// with sources that are (raise `max_sources` if this grows).
    SourceTableFull,
    /// The source has `max_connections_per_source` open.
    SourceLimit,
    /// The listener has `max_connections` open.
    ListenerFull,
    /// Every candidate backend has `max_connections` open.
    BackendFull,
    /// The process is out of file descriptors or memory.
    Overloaded,
    /// The UDP flow table is full.
    FlowTableFull,
    /// `accept_proxy`: the connection came from outside `trusted_sources`.
    ProxyUntrusted,
    /// `accept_proxy`: the first bytes are not a valid PROXY header.
    ProxyMalformed,
    /// `accept_proxy`: the header is longer than ringlb reads.
    ProxyOversized,
    /// `accept_proxy`: no whole header within `proxy_header_timeout`.
    ProxyTimeout,
    /// The client closed or reset before its PROXY header or ClientHello was read.
    ClientClosed,
    /// SNI routing with `sni_fallback = "refuse"`: not TLS, no SNI, or no route.
    SniUnmatched,
    /// SNI routing with `sni_fallback = "refuse"`: no ClientHello within `sni_timeout`.
    SniTimeout,
}

impl RefuseReason {
    /// Every reason, for exposition (index = `reason as usize`).
    pub const ALL: [RefuseReason; 16] = [
        RefuseReason::NoBackend,
        RefuseReason::ConnectFailed,
        RefuseReason::RateLimited,
        RefuseReason::SourceTableFull,
        RefuseReason::SourceLimit,
        RefuseReason::ListenerFull,
        RefuseReason::BackendFull,
        RefuseReason::Overloaded,
        RefuseReason::FlowTableFull,
        RefuseReason::ProxyUntrusted,
        RefuseReason::ProxyMalformed,
        RefuseReason::ProxyOversized,
        RefuseReason::ProxyTimeout,
        RefuseReason::ClientClosed,
        RefuseReason::SniUnmatched,
        RefuseReason::SniTimeout,
    ];

    /// The label used in metrics and `ctl stats`.
    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::NoBackend => "no_backend",
            RefuseReason::ConnectFailed => "connect_failed",
            RefuseReason::RateLimited => "rate_limited",
            RefuseReason::SourceTableFull => "source_table_full",
            RefuseReason::SourceLimit => "source_limit",
            RefuseReason::ListenerFull => "listener_full",
            RefuseReason::BackendFull => "backend_full",
            RefuseReason::Overloaded => "overloaded",
            RefuseReason::FlowTableFull => "flow_table_full",
            RefuseReason::ProxyUntrusted => "proxy_untrusted",
            RefuseReason::ProxyMalformed => "proxy_malformed",
            RefuseReason::ProxyOversized => "proxy_oversized",
            RefuseReason::ProxyTimeout => "proxy_timeout",
            RefuseReason::ClientClosed => "client_closed",
            RefuseReason::SniUnmatched => "sni_unmatched",
            RefuseReason::SniTimeout => "sni_timeout",
        }
    }
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// Connections accepted.
    pub accepted: Counter,
    /// Connections relayed (open now = opened - closed).
    pub active: Gauge,
    /// Refusals, indexed like [`RefuseReason::ALL`].
    pub refused: [Counter; RefuseReason::ALL.len()],
    /// UDP datagrams received from clients.
    pub datagrams_in: Counter,
    /// UDP datagrams sent back to clients.
    pub datagrams_out: Counter,
    /// UDP datagrams dropped (send failed, backend unreachable).
    pub datagrams_dropped: Counter,
    /// UDP datagrams dropped because they were too short to carry the
    /// routing token (`hash_key = "token"`); also in `datagrams_dropped`.
    pub datagrams_short: Counter,
    /// Bytes from clients to backends.
    pub bytes_in: Counter,
    /// Bytes from backends to clients.
    pub bytes_out: Counter,
    /// Accept errors (EMFILE and others).
    pub accept_errors: Counter,
    /// Backend connect latency (successful connects).
    pub connect_latency: Histogram,
    /// Set when this listener was removed and its drain time is over: its
    /// connections close when woken.
    pub closing: std::sync::atomic::AtomicBool,
}

impl ListenerStats {
    /// Zeroed stats for `workers` workers.
    pub fn new(workers: usize) -> Self {
        ListenerStats {
            accepted: Counter::new(workers),
            active: Gauge::new(workers),
            refused: std::array::from_fn(|_| Counter::new(workers)),
            datagrams_in: Counter::new(workers),
            datagrams_out: Counter::new(workers),
            datagrams_dropped: Counter::new(workers),
            datagrams_short: Counter::new(workers),
            bytes_in: Counter::new(workers),
            bytes_out: Counter::new(workers),
            accept_errors: Counter::new(workers),
            connect_latency: Histogram::new(workers),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts one refusal.
    pub fn refuse(&self, reason: RefuseReason) {
        self.refused[reason as usize].inc();
    }
}

/// Counters of one backend; kept across table rebuilds and reloads.
#[derive(Debug)]
pub struct BackendStats {
    /// Connections to it (open now = opened - closed).
    pub conns: Gauge,
    /// Bytes sent to it.
    pub bytes_in: Counter,
    /// Bytes received from it.
    pub bytes_out: Counter,
    /// Connect failures and timeouts.
    pub connect_failures: Counter,
    /// UDP flows to it (also counted in `conns`): the flows `ctl what-if`
    /// says would re-pick if it left the pool.
    pub udp_flows: Gauge,
}

impl BackendStats {
    /// Zeroed stats.
    pub fn new(workers: usize) -> Self {
        BackendStats {
            conns: Gauge::new(workers),
            bytes_in: Counter::new(workers),
            bytes_out: Counter::new(workers),
            connect_failures: Counter::new(workers),
            udp_flows: Gauge::new(workers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn workers_sum_without_losing_counts() {
        let c = Arc::new(Counter::new(4));
        let threads: Vec<_> = (0..4)
            .map(|id| {
                let c = c.clone();
                std::thread::spawn(move || {
                    set_worker_slot(id);
                    for _ in 0..10_000 {
                        c.inc();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.add(5); // a non-worker thread lands on the shared shard
        assert_eq!(c.get(), 40_005);
        assert!((0..4).all(|id| c.worker(id) == 10_000));
        assert_eq!(c.worker(4), 0, "the shared shard is no worker's");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(1);
        h.observe(std::time::Duration::from_micros(50));
        h.observe(std::time::Duration::from_millis(3));
        h.observe(std::time::Duration::from_secs(10));
        let c = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[5], 2); // <= 5ms
        assert_eq!(*c.last().unwrap(), 3);
        assert_eq!(h.sum_micros.get(), 50 + 3000 + 10_000_000);
    }

    #[test]
    fn all_is_indexed_by_discriminant() {
        // `refused[reason as usize]` and the exposition both rely on it.
        for (i, r) in RefuseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.label());
        }
    }

    #[test]
    fn gauge_counts_open_minus_closed() {
        let g = Gauge::new(2);
        g.opened.add(3);
        g.closed.inc();
        assert_eq!(g.current(), 2);
    }
}
