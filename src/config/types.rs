//! The validated configuration's types: what the rest of ringlb reads.
//! Built only by `super::validate` (see `super` for the pipeline).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default listen backlog.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Most connect attempts a listener may ask for.
pub const MAX_CONNECT_ATTEMPTS: u32 = 16;

/// A validated configuration, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from (`None` for the embedded demo config).
    pub source: Option<PathBuf>,
    /// Threads and io engine.
    pub runtime: RuntimeConfig,
    /// Control socket and metrics.
    pub control: ControlConfig,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Pools, in file order.
    pub pools: Vec<PoolConfig>,
    /// Client regions.
    pub geo: GeoConfig,
}

/// `[geo]`: region names and the client-address map.
#[derive(Debug, Clone)]
pub struct GeoConfig {
    /// Every region name used anywhere ("default" is id 0).
    pub names: Arc<crate::geo::RegionNames>,
    /// Longest-prefix map of client addresses.
    pub map: Arc<crate::geo::RegionMap>,
    /// The prefixes the map was built from (what two configs compare by).
    pub(super) entries: Vec<(crate::geo::Cidr, crate::geo::RegionId)>,
}

impl PartialEq for GeoConfig {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries && self.names.iter().eq(other.names.iter())
    }
}

impl Default for GeoConfig {
    fn default() -> Self {
        let names = crate::geo::RegionNames::new();
        GeoConfig {
            map: Arc::new(crate::geo::RegionMap::new(Vec::new(), crate::geo::RegionNames::DEFAULT).expect("empty map")),
            names: Arc::new(names),
            entries: Vec::new(),
        }
    }
}

/// `[pool.geo]`: the multipliers of one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolGeo {
    /// Per client region: (backend region, multiplier). A client region with
    /// no row uses the `default` row; with neither, plain weights.
    pub rows: Vec<(crate::geo::RegionId, Vec<(crate::geo::RegionId, u32)>)>,
    /// Spill threshold.
    pub spill_threshold: crate::geo::SpillThreshold,
}

impl PoolGeo {
    /// The row for `client`, falling back to `default`.
    pub fn row(&self, client: crate::geo::RegionId) -> Option<&[(crate::geo::RegionId, u32)]> {
        self.rows
            .iter()
            .find(|(r, _)| *r == client)
            .or_else(|| self.rows.iter().find(|(r, _)| *r == crate::geo::RegionNames::DEFAULT))
            .map(|(_, m)| m.as_slice())
    }
}

/// Which io engine workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngineChoice {
    /// io_uring when it can be set up, else epoll with a warning.
    Auto,
    /// io_uring or fail at start.
    Uring,
    /// The edge-triggered epoll loop.
    Epoll,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Worker threads.
    pub workers: usize,
    /// io engine choice.
    pub io_engine: IoEngineChoice,
    /// Pin worker N to CPU N (off by default: it hurts on small shared machines).
    pub pin_workers: bool,
    /// Time open connections get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
}

/// `[control]`
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ControlConfig {
    /// Unix control socket path.
    pub socket: Option<PathBuf>,
    /// Prometheus endpoint address.
    pub metrics: Option<SocketAddr>,
    /// Log one line per connection at info (text) or as JSON.
    pub access_log: AccessLog,
    /// JSON access log file (stderr when `None`).
    pub access_log_file: Option<PathBuf>,
    /// Operator states kept across restarts and upgrades (relative paths
    /// are resolved against the config file's directory).
    pub state_file: Option<PathBuf>,
}

/// `[control] access_log`: one record per closed connection and expired UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLog {
    /// No access log.
    #[default]
    Off,
    /// One `info` line per closed TCP connection, through the log.
    Text,
    /// One JSON object per line, written by a thread of its own.
    Json,
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP, relayed per connection.
    Tcp,
    /// UDP, balanced per flow.
    Udp,
}

/// What the Maglev lookup hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKey {
    /// Client IP only: a client always lands on the same backend.
    SrcIp,
    /// Client IP and port: connections of one client spread.
    SrcIpPort,
    /// UDP: a token carried in each datagram (`[listener.token]`).
    Token,
}

/// `[[listener]]`
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Unique name.
    pub name: String,
    /// Address accepted on.
    pub bind: SocketAddr,
    /// Transport.
    pub protocol: Protocol,
    /// Pool clients are sent to.
    pub pool: String,
    /// Flow key of the Maglev lookup.
    pub hash_key: HashKey,
    /// Backend connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout (no bytes either way).
    pub idle_timeout: Duration,
    /// Listen backlog.
    pub backlog: u32,
    /// Distinct backends tried per connection.
    pub connect_attempts: u32,
    /// UDP: most flows across all workers.
    pub max_flows: usize,
    /// Most open connections (UDP: flows) across workers; 0 = no limit.
    pub max_connections: u64,
    /// Most open connections from one source; 0 = no limit.
    pub max_connections_per_source: u64,
    /// Per-source token buckets.
    pub rate_limit: Option<RateLimitConfig>,
    /// How TCP bytes are moved.
    pub relay: RelayMode,
    /// PROXY protocol header sent to the backend first (UDP: on every datagram).
    pub proxy_protocol: ProxyProtocol,
    /// Which address backends are connected to from.
    pub source: super::SourceMode,
    /// UDP with `hash_key = "token"`: where the token is.
    pub token: Option<super::TokenConfig>,
    /// PROXY headers accepted from clients (`accept_proxy`).
    pub accept_proxy: Option<super::preread::AcceptProxyConfig>,
    /// Routing by TLS server name (`[[listener.route]]`).
    pub sni: Option<super::preread::SniConfig>,
}

impl ListenerConfig {
    /// Whether `other` is this listener across a reload: same name, address
    /// and protocol. Such a listener keeps its sockets, slot and counters and
    /// is updated in place; any other difference retires it and binds a new
    /// one. The one definition of the rule, used by the reload's bind step
    /// and by the model.
    pub fn same_listener(&self, other: &ListenerConfig) -> bool {
        self.name == other.name && self.bind == other.bind && self.protocol == other.protocol
    }
}

// `proxy_protocol`'s type lives with the header code (one place for the
// PROXY protocol's types); config names it from there.
pub use crate::proxy::proxy_protocol::ProxyProtocol;

/// How a TCP listener moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Through user-space buffers (io_uring reads and writes on that engine).
    Copy,
    /// socket → pipe → socket with splice(2), readiness first.
    Splice,
    /// Copy, switching a direction to splice once it moves bulk data.
    Auto,
}

/// `[listener.rate_limit]`
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// New connections (UDP: new flows) per source.
    pub connections: crate::token_bucket::BucketParams,
    /// UDP datagrams per source (None = no packet limit).
    pub packets: Option<crate::token_bucket::BucketParams>,
    /// IPv4 prefix length of one source.
    pub prefix_v4: u8,
    /// IPv6 prefix length of one source.
    pub prefix_v6: u8,
    /// Sources tracked at most (per table).
    pub max_sources: usize,
}

/// `[[pool]]`
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Unique name.
    pub name: String,
    /// Maglev table size (prime).
    pub table_size: usize,
    /// Grace period of a drained backend's connections.
    pub drain_timeout: Duration,
    /// Healthy share (0..=1) below which the pool panics.
    pub panic_threshold: f64,
    /// Slow-start ramp (zero = off).
    pub slow_start: Duration,
    /// Active checks.
    pub health_check: HealthCheckConfig,
    /// Passive checks.
    pub outlier: OutlierConfig,
    /// Region multipliers (None = not a geo pool).
    pub geo: Option<PoolGeo>,
    /// How a backend is chosen among the usable ones.
    pub balance: Balance,
    /// Maglev with bounded loads: the load bound in percent of the weighted
    /// average (`None` = off; only with [`Balance::Maglev`]).
    pub hash_balance_factor: Option<u32>,
    /// What a backend going down does to its open connections.
    pub on_down: OnDown,
    /// What a primary coming back does to the connections on backups.
    pub on_up: OnUp,
    /// Backends, in file order.
    pub backends: Vec<BackendConfig>,
}

/// `balance`: how a pool picks a backend for a new connection or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Weighted Maglev on the flow hash (optionally with bounded loads).
    #[default]
    Maglev,
    /// Weighted least connections across all workers; ties by flow hash.
    LeastConn,
    /// Power of two choices on connection counts, weighted.
    RandomTwo,
}

impl Balance {
    /// The name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Balance::Maglev => "maglev",
            Balance::LeastConn => "least_conn",
            Balance::RandomTwo => "random_two",
        }
    }
}

/// `on_down`: a backend's open connections when it goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDown {
    /// They stay open (they end by themselves).
    #[default]
    Keep,
    /// They are closed at once, so clients reconnect elsewhere.
    Close,
}

/// `on_up`: the connections on backups when a primary is usable again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUp {
    /// They stay open.
    #[default]
    Keep,
    /// They are closed, so clients reconnect to the primaries.
    CloseBackups,
}

/// What an active check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// No active checks: backends are up unless ejected.
    None,
    /// A connect within the timeout.
    Tcp,
    /// Connect, send `send`, and the reply must start with `expect`.
    SendExpect {
        /// Bytes sent (may be empty for servers that greet first).
        send: Vec<u8>,
        /// Required reply prefix.
        expect: Vec<u8>,
    },
    /// Send the datagram `send`; the reply datagram must start with `expect`.
    UdpSendExpect {
        /// Probe datagram.
        send: Vec<u8>,
        /// Required reply prefix.
        expect: Vec<u8>,
    },
    /// An HTTP/1.1 request; the status (and optionally the body) decide.
    Http(HttpCheck),
    /// A PostgreSQL startup exchange.
    Postgres(PostgresCheck),
    /// A MySQL/MariaDB greeting (and login, with a `user`).
    Mysql(MysqlCheck),
    /// Redis `PING` (and `ROLE`).
    Redis(RedisCheck),
}

// The protocol checks' settings live beside their parsers (the pure layer that
// config builds on); config validates them and re-exports them.
pub use crate::health::probe::spec::{HttpCheck, MysqlCheck, PostgresCheck, RedisCheck, RedisRole, StatusMatch};

/// `[pool.health_check]`
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// The check.
    pub kind: CheckKind,
    /// Between checks of one backend.
    pub interval: Duration,
    /// Per check.
    pub timeout: Duration,
    /// Successes in a row to go up.
    pub rise: u32,
    /// Failures in a row to go down.
    pub fall: u32,
    /// Random extra delay, up to this, per interval.
    pub jitter: Duration,
    /// Port override.
    pub port: Option<u16>,
    /// State before the first check.
    pub initially_up: bool,
    /// Checks of this pool in flight at once.
    pub max_concurrent: usize,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: CheckKind::None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            jitter: Duration::from_millis(400),
            port: None,
            initially_up: true,
            max_concurrent: 64,
        }
    }
}

/// `[pool.outlier]`
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Connect failures in a row that eject (0 = off).
    pub consecutive_failures: u32,
    /// First ejection time.
    pub ejection_time: Duration,
    /// Longest ejection time.
    pub max_ejection_time: Duration,
    /// Most of the pool ejected at once (0..=1, share of backends).
    pub max_ejection_share: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_share: 0.5,
        }
    }
}

/// `[[pool.backend]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Address connected to.
    pub addr: SocketAddr,
    /// Relative share of the Maglev table.
    pub weight: u32,
    /// Where health checks go (default: `addr`, with the pool's port override).
    pub check_addr: Option<SocketAddr>,
    /// Most open connections to it; 0 = no limit.
    pub max_connections: u64,
    /// Region it runs in (geo pools).
    pub region: Option<crate::geo::RegionId>,
    /// A backup: used only while no primary (non-backup) backend is usable.
    pub backup: bool,
}
