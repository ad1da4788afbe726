//! One listener's admission state, shared by all its workers: per-source
//! token buckets, the listener's connection count, per-source counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crossbeam::utils::CachePadded;
use parking_lot::Mutex;

use super::{Admission, ConnLimit, SourceKey, SourceTable};
use crate::config::{ListenerConfig, RateLimitConfig};
use crate::stats::RefuseReason;

/// Shards of the per-source connection counts (same idea as the source table:
/// short, rarely contended critical sections).
const COUNT_SHARDS: usize = 64;

/// Open connections per source. An entry exists only while its source has a
/// connection open, so the map is bounded by the open connections (which the
/// listener's `max_connections` and the fd limit bound in turn).
pub struct SourceConns {
    max: u32,
    shards: Box<[CountShard]>,
}

/// One shard of [`SourceConns`].
type CountShard = CachePadded<Mutex<HashMap<SourceKey, u32>>>;

impl SourceConns {
    fn new(max: u32) -> Self {
        SourceConns {
            max,
            shards: (0..COUNT_SHARDS)
                .map(|_| CachePadded::new(Mutex::new(HashMap::new())))
                .collect(),
        }
    }

    fn shard(&self, key: SourceKey) -> &Mutex<HashMap<SourceKey, u32>> {
        let h = xxhash_rust::xxh3::xxh3_64(&key.to_bits().to_le_bytes());
        &self.shards[(h as usize) % COUNT_SHARDS]
    }

    /// Counts one more connection from `key` unless it has `max` open.
    pub fn try_acquire(&self, key: SourceKey) -> bool {
        let mut map = self.shard(key).lock();
        let n = map.entry(key).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts one connection from `key` closed.
    pub fn release(&self, key: SourceKey) {
        let mut map = self.shard(key).lock();
        if let Some(n) = map.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }
}

/// A listener's admission state.
pub struct ListenerLimits {
    rate: Option<RateLimitConfig>,
    /// Buckets for new connections (UDP: new flows).
    pub connections: Option<SourceTable>,
    /// Buckets for UDP datagrams.
    pub packets: Option<SourceTable>,
    /// The listener's open connections (None = no limit).
    pub open: Option<ConnLimit>,
    /// Open connections per source (None = no limit).
    pub per_source: Option<SourceConns>,
    max_open: u64,
    max_per_source: u64,
}

impl ListenerLimits {
    /// The limits `config` asks for.
    pub fn new(config: &ListenerConfig) -> Self {
        let rate = config.rate_limit.clone();
        ListenerLimits {
            connections: rate.as_ref().map(|r| SourceTable::new(r.connections, r.max_sources)),
            packets: rate
                .as_ref()
                .and_then(|r| r.packets.map(|p| SourceTable::new(p, r.max_sources))),
            open: (config.max_connections > 0).then(|| ConnLimit::new(config.max_connections as usize)),
            per_source: (config.max_connections_per_source > 0)
                .then(|| SourceConns::new(config.max_connections_per_source.min(u32::MAX as u64) as u32)),
            rate,
            max_open: config.max_connections,
            max_per_source: config.max_connections_per_source,
        }
    }

    /// Whether `config` asks for exactly these limits (a reload then keeps
    /// the buckets and counts as they are).
    pub fn matches(&self, config: &ListenerConfig) -> bool {
        self.rate == config.rate_limit
            && self.max_open == config.max_connections
            && self.max_per_source == config.max_connections_per_source
    }

    /// The source key of a client address.
    pub fn source_key(&self, ip: IpAddr) -> SourceKey {
        let (v4, v6) = self.rate.as_ref().map_or((32, 128), |r| (r.prefix_v4, r.prefix_v6));
        SourceKey::from_ip(ip, v4, v6)
    }

    /// Admits a new TCP connection from `key` at `now`, or says why not. On
    /// success the caller must call [`ListenerLimits::release`] when it ends.
    pub fn admit_connection(&self, key: SourceKey, now: Instant) -> Result<(), RefuseReason> {
        if let Some(t) = &self.connections {
            refusal(t.admit(key, now))?;
        }
        if let Some(open) = &self.open {
            if !open.try_acquire() {
                return Err(RefuseReason::ListenerFull);
            }
        }
        if let Some(ps) = &self.per_source {
            if !ps.try_acquire(key) {
                if let Some(open) = &self.open {
                    open.release();
                }
                return Err(RefuseReason::SourceLimit);
            }
        }
        Ok(())
    }

    /// Releases what [`ListenerLimits::admit_connection`] counted.
    pub fn release(&self, key: SourceKey) {
        if let Some(open) = &self.open {
            open.release();
        }
        if let Some(ps) = &self.per_source {
            ps.release(key);
        }
    }

    /// Admits a new UDP flow from `key` (token bucket only), or says why not.
    pub fn check_flow(&self, key: SourceKey, now: Instant) -> Result<(), RefuseReason> {
        self.connections.as_ref().map_or(Ok(()), |t| refusal(t.admit(key, now)))
    }

    /// Admits one UDP datagram from `key`, or says why not.
    pub fn check_packet(&self, key: SourceKey, now: Instant) -> Result<(), RefuseReason> {
        self.packets.as_ref().map_or(Ok(()), |t| refusal(t.admit(key, now)))
    }

    /// Sources tracked, evictions, refusals because the table was saturated.
    pub fn source_stats(&self) -> Option<super::SourceTableStats> {
        self.connections.as_ref().map(|t| t.stats())
    }
}

/// The refusal reason of a token-bucket outcome: an exact bucket's refusal is
/// `rate_limited`; the overflow sketch's, for a source the full table could not hold, is
/// `source_table_full` (it may be a neighbour's flood, not this source's rate).
fn refusal(outcome: Admission) -> Result<(), RefuseReason> {
    match outcome {
        Admission::Admitted => Ok(()),
        Admission::Limited => Err(RefuseReason::RateLimited),
        Admission::TableFull => Err(RefuseReason::SourceTableFull),
    }
}

impl std::fmt::Debug for ListenerLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerLimits")
            .field("rate", &self.rate)
            .field("max_open", &self.max_open)
            .field("max_per_source", &self.max_per_source)
            .finish()
    }
}
