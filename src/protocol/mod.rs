//! The control protocol: one JSON request per line, one JSON reply per line,
//! as typed values shared by the server, `ringlb ctl` and the tests.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"backends","pool":"web"}` (paged
//! with `"limit"` and `"offset"`: backends per pool),
//! `{"cmd":"drain","pool":"web","addr":"10.0.0.1:80"}`, `enable`, `disable`,
//! `{"cmd":"weight","pool":..,"addr":..,"weight":5}`,
//! `{"cmd":"add","pool":..,"addr":..,"weight":2}`, `remove`, `{"cmd":"reload"}`,
//! `{"cmd":"stats"}`, `{"cmd":"route","listener":..,"client":..[,"token":HEX]}`,
//! `{"cmd":"what_if","pool":..,"change":"remove|add|weight","addr":..,"weight":3}`. `drain`,
//! `disable`, `weight`, `add` and `remove` take `"force": true` to leave a
//! pool with no usable backend. Replies: `{"ok":true,...}` with the verb's
//! reply fields ([`Reply`]), or `{"ok":false,"error":"..."}`.
//!
//! To add a verb: one [`Request`] variant, one reply struct, one [`Reply`]
//! variant, one arm in [`Reply::parse`]; the compiler finds the rest.
//! Reply structs do not deny unknown fields, so a newer server's extra
//! fields never break an older `ctl`.

pub mod client;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version `status` reports (`"protocol"`): raised when a
/// request or reply changes in a way an older client would misread.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request: one line, `{"cmd": VERB, ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Unit variants would silently accept extra fields (serde ignores
// deny_unknown_fields there), so every variant is a struct variant.
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Version, uptime, engines, config, listeners.
    Status {},
    /// Per-backend state and counters.
    Backends {
        /// Only this pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
        /// At most this many backends per pool (paging; all by default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        /// Skip this many backends of each pool first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<usize>,
    },
    /// No new connections; existing ones finish within drain_timeout.
    Drain {
        /// Pool name.
        pool: String,
        /// Backend address.
        addr: String,
        /// Do it even if it leaves the pool with no usable backend.
        #[serde(default)]
        force: bool,
    },
    /// Back in service.
    Enable {
        /// Pool name.
        pool: String,
        /// Backend address.
        addr: String,
    },
    /// Out of service: like drain.
    Disable {
        /// Pool name.
        pool: String,
        /// Backend address.
        addr: String,
        /// Do it even if it leaves the pool with no usable backend.
        #[serde(default)]
        force: bool,
    },
    /// Change a weight.
    Weight {
        /// Pool name.
        pool: String,
        /// Backend address.
        addr: String,
        /// New weight.
        weight: i64,
        /// Do it even if it leaves the pool with no usable backend.
        #[serde(default)]
        force: bool,
    },
    /// Add a backend.
    Add {
        /// Pool name.
        pool: String,
        /// Backend address.
        addr: String,
        /// Weight (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<i64>,
        /// Do it even if it leaves the pool with no usable backend.
        #[serde(default)]
        force: bool,
    },
    /// Drain, then remove a backend.
    Remove {
        /// Pool name.
        pool: String,
        /// Backend address.
        addr: String,
        /// Do it even if it leaves the pool with no usable backend.
        #[serde(default)]
        force: bool,
    },
    /// Re-read the config file.
    Reload {},
    /// Counters.
    Stats {},
    /// What fraction of the pool's key space a change would move, and where
    /// to; nothing is changed. `change` is `remove`, `add` or `weight`.
    WhatIf {
        /// Pool name.
        pool: String,
        /// `remove`, `add` or `weight`.
        change: String,
        /// Backend address.
        addr: String,
        /// `add`: the weight (default 1); `weight`: the new weight.
        #[serde(default)]
        weight: Option<i64>,
    },
    /// A new ringlb process (`run --takeover`) asks for the listening
    /// sockets; served only by the control socket (see `control::takeover`).
    Takeover {
        /// The handover protocol the new process speaks.
        protocol: u32,
        /// Its process id, for the logs.
        pid: u32,
    },
    /// Explain where a client would go: region, table, chosen backend, next candidates.
    Route {
        /// Listener name.
        listener: String,
        /// Client address: `ip` or `ip:port`.
        client: String,
        /// The routing token in hex (`hash_key = "token"` listeners).
        #[serde(default)]
        token: Option<String>,
    },
}

impl Request {
    /// The request as its wire line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a request always serializes")
    }
}

/// Parses one request line; the error is what the client is told.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty request".into());
    }
    // serde's tagged enums also take a sequence (`["drain","web","10.0.0.1:80"]`
    // would drain): the protocol is one JSON object per line, nothing else.
    if !line.starts_with('{') {
        return Err("bad request: expected a JSON object such as {\"cmd\":\"status\"}".into());
    }
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

// === replies ===

/// A reply: the verb's fields, or the error the server refused it with.
/// `'a` lets the server serialize the big `backends` reply from borrowed
/// strings; a parsed reply owns its strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<'a> {
    /// To `status`.
    Status(StatusReply),
    /// To `backends`.
    Backends(BackendsReply<'a>),
    /// To `stats`.
    Stats(StatsReply),
    /// To `route`.
    Route(RouteReply),
    /// To `drain` and `disable`.
    Drain(DrainReply),
    /// To `enable`.
    Enable(EnableReply),
    /// To `weight`.
    Weight(WeightReply),
    /// To `add`.
    Add(AddReply),
    /// To `remove`.
    Remove(RemoveReply),
    /// To `reload`.
    Reload(ReloadReply),
    /// To `what_if`: the fractions moved and the from→to matrix, per table.
    WhatIf(WhatIfReply),
    /// Any request refused: `{"ok":false,"error":...}`.
    Error(String),
}

/// `{"ok": true, ...body}` on the wire.
#[derive(Serialize)]
struct OkLine<'b, T> {
    ok: bool,
    #[serde(flatten)]
    body: &'b T,
}

/// `{"ok": false, "error": ...}` on the wire.
#[derive(Serialize, Deserialize)]
struct ErrorLine {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

fn ok_line<T: Serialize>(body: &T) -> String {
    serde_json::to_string(&OkLine { ok: true, body })
        .unwrap_or_else(|e| error_line(&format!("cannot encode the reply: {e}")))
}

/// An error reply line.
pub fn error_line(message: &str) -> String {
    serde_json::to_string(&ErrorLine {
        ok: false,
        error: Some(message.to_string()),
    })
    .expect("a string always serializes")
}

fn body<T: DeserializeOwned>(line: &str) -> Result<T, String> {
    serde_json::from_str(line).map_err(|e| e.to_string())
}

impl Reply<'_> {
    /// Whether the request was carried out.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Reply::Error(_))
    }

    /// The reply as its wire line (without the newline).
    pub fn to_line(&self) -> String {
        match self {
            Reply::Status(r) => ok_line(r),
            Reply::Backends(r) => ok_line(r),
            Reply::Stats(r) => ok_line(r),
            Reply::Route(r) => ok_line(r),
            Reply::Drain(r) => ok_line(r),
            Reply::Enable(r) => ok_line(r),
            Reply::Weight(r) => ok_line(r),
            Reply::Add(r) => ok_line(r),
            Reply::Remove(r) => ok_line(r),
            Reply::Reload(r) => ok_line(r),
            Reply::WhatIf(r) => ok_line(r),
            Reply::Error(e) => error_line(e),
        }
    }

    /// Parses the reply line to `request`; the error says what is wrong
    /// with the line.
    pub fn parse(request: &Request, line: &str) -> Result<Reply<'static>, String> {
        let head: ErrorLine = body(line)?;
        if !head.ok {
            return Ok(Reply::Error(head.error.unwrap_or_else(|| "unknown error".into())));
        }
        Ok(match request {
            Request::Status {} => Reply::Status(body(line)?),
            Request::Backends { .. } => Reply::Backends(body(line)?),
            Request::Stats {} => Reply::Stats(body(line)?),
            Request::Route { .. } => Reply::Route(body(line)?),
            Request::Drain { .. } | Request::Disable { .. } => Reply::Drain(body(line)?),
            Request::Enable { .. } => Reply::Enable(body(line)?),
            Request::Weight { .. } => Reply::Weight(body(line)?),
            Request::Add { .. } => Reply::Add(body(line)?),
            Request::Remove { .. } => Reply::Remove(body(line)?),
            Request::Reload {} => Reply::Reload(body(line)?),
            Request::WhatIf { .. } => Reply::WhatIf(body(line)?),
            // Answered by an offer and descriptors (`control::takeover`),
            // not by a reply line.
            Request::Takeover { .. } => return Err("a takeover is answered by a socket offer, not a reply".into()),
        })
    }
}

/// The JSON access log's queue in `stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccessLogCounters {
    /// Records written.
    pub written: u64,
    /// Records dropped because the queue was full.
    pub dropped: u64,
}

/// `what_if`: what a change to one pool would move (`crate::whatif`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhatIfReply {
    /// The pool's moves.
    #[serde(flatten)]
    pub pool: PoolMoves,
    /// The change in words, e.g. `remove 10.0.0.1:80`.
    pub change: String,
    /// Open UDP flows on a removed backend, which would pick another.
    pub udp_flows_repick: u64,
}

/// What a change moves in one pool: one entry per table (one, or one per
/// client region of a geo pool). Also the offline `ringlb what-if`'s entry
/// per pool of either file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolMoves {
    /// The pool's name.
    pub pool: String,
    /// Why there is nothing to compare (the pool is in one file only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Table sizes before and after (offline, when both files have the pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<OldNew>,
    /// Per table (all clients, or one client region).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_space: Vec<TableMoves>,
}

/// A value before and after a change.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OldNew {
    /// Before.
    pub old: usize,
    /// After.
    pub new: usize,
}

/// What a change moves in one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableMoves {
    /// The client region whose table this is; `None` for all clients.
    pub region: Option<String>,
    /// Fraction of the key space whose backend changes, 0..=1 (rounded to 1e-6).
    pub moved_fraction: f64,
    /// The largest from→to moves, largest first.
    pub moves: Vec<Move>,
    /// How many smaller moves are not listed.
    pub moves_omitted: usize,
}

/// Part of the key space going from one backend to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The backend it leaves, or `(none)`: no usable backend before.
    pub from: String,
    /// The backend it goes to, or `(none)`.
    pub to: String,
    /// Fraction of the key space, 0..=1 (rounded to 1e-6).
    pub fraction: f64,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// ringlb's version.
    pub version: String,
    /// This process's id.
    #[serde(default)]
    pub pid: u32,
    /// During an upgrade: the process this one took over from, still
    /// finishing its connections (its last report; null once it exited).
    #[serde(default)]
    pub predecessor: Option<PredecessorStatus>,
    /// The control protocol the server speaks ([`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// One per worker.
    pub workers: Vec<WorkerStatus>,
    /// The config file (none: embedded config).
    pub config: Option<String>,
    /// Successful config loads (1 = the file at start).
    pub config_generation: u64,
    /// Snapshots published.
    pub snapshot_generation: u64,
    /// Live listeners.
    pub listeners: Vec<ListenerStatus>,
    /// Set once a SIGTERM/SIGINT has stopped the listeners (`ringlb
    /// announce` withdraws the route at once rather than at the exit).
    #[serde(default)]
    pub stopping: bool,
    /// Per pool: what decides its routing, so two instances can be compared
    /// at a glance (`ringlb fleet check` does it).
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
}

/// The draining previous process in `status` (as it last reported itself
/// over the handover connection, `control::takeover`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredecessorStatus {
    /// Its process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Its config generation.
    pub config_generation: u64,
    /// Connections it still has open.
    pub open_connections: u64,
}

/// One pool in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// `crate::fleet::fingerprint::pool_fingerprint`, 16 hex digits.
    pub fingerprint: String,
    /// `MaglevTable::digest` of the table (none: no table).
    pub table_digest: Option<String>,
    /// Configured table size.
    pub table_size: usize,
    /// Rebuilds of its table.
    pub table_generation: u64,
    /// Backends with a share of the table.
    pub usable_backends: usize,
    /// Backends in the pool.
    pub backends: usize,
}

/// One worker in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Worker number.
    pub id: usize,
    /// `io_uring` or `epoll`.
    pub engine: String,
    /// How its loop was set up (e.g. the io_uring flags).
    pub setup: String,
    /// TCP connections and UDP flows it accepted, over all listeners.
    pub accepted: u64,
    /// The CPU it is pinned to (none: not pinned).
    pub cpu: Option<usize>,
}

/// One listener in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Address.
    pub bind: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Its pool.
    pub pool: String,
    /// Open connections (UDP: flows).
    pub active: u64,
}

/// `backends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendsReply<'a> {
    /// One per live pool (or the one asked for).
    pub pools: Vec<PoolRow<'a>>,
}

/// One pool in `backends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRow<'a> {
    /// Pool name.
    pub pool: Cow<'a, str>,
    /// Rebuilds of its table.
    pub table_generation: u64,
    /// Whether the table is in panic mode.
    pub panic: bool,
    /// `balance` (`maglev`, `least_conn`, `random_two`).
    #[serde(default)]
    pub balance: Cow<'a, str>,
    /// Whether the backups serve (no primary is usable).
    #[serde(default)]
    pub backup_tier: bool,
    /// Backends in the pool (the page is `backends`).
    pub total_backends: usize,
    /// Index of the first backend shown.
    pub offset: usize,
    /// The page of backends.
    pub backends: Vec<BackendRow<'a>>,
    /// Table slots (0: no table).
    pub table_size: usize,
    /// The configured table size (`table_size` is 0 while there is no table).
    #[serde(default)]
    pub configured_table_size: usize,
    /// `crate::fleet::fingerprint::pool_fingerprint`, 16 hex digits.
    #[serde(default)]
    pub fingerprint: String,
    /// `MaglevTable::digest` of the table (depends on listing order).
    #[serde(default)]
    pub table_digest: Option<String>,
}

/// One backend in `backends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendRow<'a> {
    /// Address.
    pub addr: SocketAddr,
    /// Configured weight (or `ctl weight`'s).
    pub weight: u32,
    /// Weight in the table (its own units; 0: not in it).
    pub effective_weight: u32,
    /// Share of the pool's table slots (a geo pool's: the default region's).
    #[serde(default)]
    pub table_share: f64,
    /// `active`, `down`, `ejected`, `draining` or `disabled`.
    pub state: Cow<'a, str>,
    /// Why it last changed state.
    pub reason: Cow<'a, str>,
    /// Open connections.
    pub active: u64,
    /// Connections opened.
    pub total: u64,
    /// Bytes from clients.
    pub bytes_in: u64,
    /// Bytes to clients.
    pub bytes_out: u64,
    /// Failed connects.
    pub failures: u64,
    /// Passive ejections.
    pub ejections: u64,
    /// The last active check.
    pub last_check: Option<LastCheck<'a>>,
    /// Leaving the pool once drained.
    pub removing: bool,
    /// `primary` or `backup` (`backup = true`).
    #[serde(default)]
    pub tier: Cow<'a, str>,
}

/// A backend's last active check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastCheck<'a> {
    /// Passed, failed, or none: ringlb could not run it.
    pub ok: Option<bool>,
    /// How long it took.
    pub ms: f64,
    /// What it saw.
    pub detail: Cow<'a, str>,
}

/// `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Every listener, retired ones still draining included.
    pub listeners: Vec<ListenerCounters>,
    /// Every pool.
    pub pools: Vec<PoolCounters>,
    /// Snapshots published.
    pub snapshot_generation: u64,
    /// Successful config loads.
    pub config_generation: u64,
    /// The JSON access log's queue.
    #[serde(default)]
    pub access_log: AccessLogCounters,
}

/// One listener's counters in `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerCounters {
    /// Name.
    pub name: String,
    /// Connections (UDP: flows) accepted.
    pub accepted: u64,
    /// Accepted ones that reached a backend; every accepted one is either
    /// relayed or refused with a reason.
    pub relayed: u64,
    /// Open now.
    pub active: u64,
    /// Refusals by reason label.
    pub refused: BTreeMap<String, u64>,
    /// Bytes from clients.
    pub bytes_in: u64,
    /// Bytes to clients.
    pub bytes_out: u64,
    /// Failed accepts.
    pub accept_errors: u64,
    /// UDP datagrams from clients.
    pub datagrams_in: u64,
    /// UDP datagrams to clients.
    pub datagrams_out: u64,
    /// UDP datagrams dropped.
    pub datagrams_dropped: u64,
    /// UDP datagrams too short to carry the listener's token (dropped too).
    #[serde(default)]
    pub datagrams_short: u64,
    /// The per-source table, when the listener limits sources.
    pub sources: Option<SourceCounters>,
}

/// A listener's per-source table in `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCounters {
    /// Sources tracked now.
    pub tracked: usize,
    /// Entries evicted.
    pub evictions: u64,
    /// Sources refused a slot because the table was full.
    pub table_full: u64,
    /// Sources admitted by the sketch when the table was full.
    pub sketch_admitted: u64,
    /// Entries the table holds at most.
    pub capacity: usize,
    /// Its approximate memory.
    pub memory_bytes: usize,
}

/// One pool's figures in `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolCounters {
    /// Name.
    pub name: String,
    /// Rebuilds of its table.
    pub table_generation: u64,
    /// How long the last build took.
    pub table_build_us: u64,
    /// Whether the table is in panic mode.
    pub panic: bool,
}

/// `route`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteReply {
    /// Listener asked about.
    pub listener: String,
    /// Client address hashed.
    pub client: String,
    /// The listener's hash key.
    pub hash_key: String,
    /// Whether the port took part in the hash.
    pub port_used: bool,
    /// The token routed by (`hash_key = "token"` listeners), as given.
    #[serde(default)]
    pub token: Option<String>,
    /// The client's region in a geo pool.
    pub region: Option<String>,
    /// Which table was used.
    pub table: String,
    /// That table's generation.
    pub table_generation: u64,
    /// What a new connection would get: the first candidate not full.
    pub chosen: Option<String>,
    /// The rule that chose: `maglev`, `maglev+bounded`, `least_conn` or
    /// `random_two`, with ` (backup tier)` while the backups serve.
    #[serde(default)]
    pub rule: String,
    /// Backends the rule passed over, and why.
    #[serde(default)]
    pub skipped: Vec<SkippedCandidate>,
    /// The candidates in the order a connection tries them.
    pub candidates: Vec<Candidate>,
}

/// One backend `route`'s rule passed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedCandidate {
    /// Address.
    pub addr: String,
    /// Its load (open connections and connects in flight).
    pub open: u64,
    /// Why, e.g. `over load bound: 7 open >= 6.25`.
    pub why: String,
}

/// One `route` candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Address.
    pub addr: String,
    /// Configured weight.
    pub weight: Option<u32>,
    /// Weight in the table (its own units).
    pub effective_weight: u32,
    /// Share of the table, 0 to 1, rounded to 1e-4.
    pub table_share: f64,
    /// At its max_connections: a TCP connect skips it.
    pub full: bool,
}

/// `drain` and `disable`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainReply {
    /// Connections still open.
    pub remaining: u64,
    /// Time they have before they are closed.
    pub drain_timeout_ms: u64,
}

/// `enable`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnableReply {}

/// `weight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightReply {
    /// Weight before.
    pub old_weight: u32,
    /// Weight now.
    pub weight: u32,
}

/// `add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddReply {
    /// Address added.
    pub addr: String,
    /// Its weight.
    pub weight: u32,
}

/// `remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveReply {
    /// Connections still open (drained before it leaves).
    pub remaining: u64,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// Successful config loads, this one included.
    pub config_generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_commands() {
        assert!(matches!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status {})));
        assert!(matches!(
            parse_request(r#"{"cmd":"backends"}"#),
            Ok(Request::Backends { pool: None, .. })
        ));
        assert!(matches!(
            parse_request(r#"{"cmd":"weight","pool":"p","addr":"127.0.0.1:1","weight":3}"#),
            Ok(Request::Weight { weight: 3, .. })
        ));
    }

    #[test]
    fn rejects_garbage_unknown_and_extra_fields() {
        for bad in [
            "",
            "garbage",
            "{}",
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"drain","pool":"p"}"#,
            r#"{"cmd":"status","x":1}"#,
            // Found by the control_request fuzzer: serde took an array as the
            // variant's fields, so this reloaded and the next one drained.
            r#"["reload"]"#,
            r#"["drain","web","10.0.0.1:80"]"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn requests_round_trip_and_keep_the_old_wire_form() {
        let old_form = [
            (r#"{"cmd":"status"}"#, Request::Status {}),
            (
                r#"{"cmd":"backends","pool":null,"limit":null,"offset":null}"#,
                Request::Backends {
                    pool: None,
                    limit: None,
                    offset: None,
                },
            ),
            (
                r#"{"cmd":"add","pool":"p","addr":"127.0.0.1:1","weight":null,"force":false}"#,
                Request::Add {
                    pool: "p".into(),
                    addr: "127.0.0.1:1".into(),
                    weight: None,
                    force: false,
                },
            ),
        ];
        for (line, req) in old_form {
            assert_eq!(parse_request(line).unwrap(), req, "{line}");
            assert_eq!(parse_request(&req.to_line()).unwrap(), req);
        }
    }

    #[test]
    fn replies_keep_ok_and_fields_at_the_top_level() {
        let r = Reply::Drain(DrainReply {
            remaining: 3,
            drain_timeout_ms: 500,
        });
        assert_eq!(r.to_line(), r#"{"ok":true,"remaining":3,"drain_timeout_ms":500}"#);
        let req = Request::Drain {
            pool: "p".into(),
            addr: "127.0.0.1:1".into(),
            force: false,
        };
        assert_eq!(Reply::parse(&req, &r.to_line()).unwrap(), r);
        assert_eq!(Reply::Enable(EnableReply {}).to_line(), r#"{"ok":true}"#);
        let e = Reply::Error("no pool named \"x\"".into());
        assert_eq!(e.to_line(), r#"{"ok":false,"error":"no pool named \"x\""}"#);
        assert_eq!(Reply::parse(&req, &e.to_line()).unwrap(), e);
        // A newer server's extra field does not break the parse.
        let newer = r#"{"ok":true,"remaining":1,"drain_timeout_ms":2,"fingerprint":"ab"}"#;
        assert!(Reply::parse(&req, newer).unwrap().is_ok());
        // A missing field is an error naming it, not a silent default.
        let err = Reply::parse(&req, r#"{"ok":true,"remaining":1}"#).unwrap_err();
        assert!(err.contains("drain_timeout_ms"), "{err}");
    }
}
