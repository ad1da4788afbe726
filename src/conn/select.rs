//! The one backend selection function: client → table → ordered candidates.
//!
//! TCP connects, UDP flow creation and `ctl route` all call [`select`], so
//! `route` explains exactly what a worker does.

use std::net::{IpAddr, SocketAddr};

use crate::config::HashKey;
use crate::flow_key::flow_hash;
use crate::geo::RegionId;
use crate::snapshot::PoolSnapshot;

/// Most candidates one selection returns (spill-over and retries walk them):
/// as many as the Maglev table yields, one constant.
pub use crate::maglev::MAX_CANDIDATES;

/// The backends a client may go to, most preferred first.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    /// The client's region, in a geo pool.
    pub region: Option<RegionId>,
    /// The flow hash the table was looked up with.
    pub hash: u64,
    indices: [u32; MAX_CANDIDATES],
    len: u8,
}

impl Selection {
    /// Backend indices (into the pool snapshot's `backends`), best first.
    pub fn candidates(&self) -> &[u32] {
        &self.indices[..self.len as usize]
    }
}

/// The candidates for `client` in `pool`, at most `max` (capped at
/// [`MAX_CANDIDATES`]); `None` when the pool has no usable backend for the
/// client (fail fast, `no_backend`).
pub fn select(pool: &PoolSnapshot, client: SocketAddr, key: HashKey, max: usize) -> Option<Selection> {
    select_hash(pool, client.ip(), flow_hash(client, key), max)
}

/// Like [`select`] with the flow hash given: UDP token routing hashes the
/// token carried in the datagram ([`crate::flow_key::token_hash`]); the
/// client's IP still picks the region's table in a geo pool.
pub fn select_hash(pool: &PoolSnapshot, client: IpAddr, hash: u64, max: usize) -> Option<Selection> {
    let (table, region) = pool.table_for(client);
    let table = table?;
    let mut sel = Selection {
        region,
        hash,
        indices: [0; MAX_CANDIDATES],
        len: 0,
    };
    for index in table.candidates(hash, max.min(MAX_CANDIDATES)) {
        sel.indices[sel.len as usize] = index;
        sel.len += 1;
    }
    (sel.len > 0).then_some(sel)
}
