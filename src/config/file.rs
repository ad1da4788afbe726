//! The config file as written: raw serde structs that reject unknown keys.
//!
//! Nothing here is validated beyond TOML types; `validate` turns a
//! [`ConfigFile`] into a typed [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[runtime]`
    #[serde(default)]
    pub runtime: RuntimeFile,
    /// `[control]`
    #[serde(default)]
    pub control: ControlFile,
    /// `[[listener]]`
    #[serde(default)]
    pub listener: Vec<ListenerFile>,
    /// `[[pool]]`
    #[serde(default)]
    pub pool: Vec<PoolFile>,
    /// `[geo]`
    pub geo: Option<GeoFile>,
}

/// `[geo]`: client regions by longest-prefix match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoFile {
    /// A `CIDR,REGION` file (GeoIP CSV shape), relative to the config file.
    pub prefixes_file: Option<String>,
    /// Inline `"CIDR" = "REGION"` entries.
    pub prefixes: Option<BTreeMap<String, String>>,
}

/// `[runtime]`: threads and io engine.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    /// Worker threads; default one per online CPU.
    pub workers: Option<i64>,
    /// `auto`, `uring` or `epoll`.
    pub io_engine: Option<String>,
    /// Pin worker N to CPU N.
    pub pin_workers: Option<bool>,
    /// How long open connections may finish after SIGTERM.
    pub shutdown_timeout: Option<String>,
}

/// `[control]`: the operator's side.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// Path of the Unix control socket.
    pub socket: Option<String>,
    /// `host:port` of the Prometheus endpoint.
    pub metrics: Option<String>,
    /// `false`/`"off"`, `true`/`"text"` (one info line per closed
    /// connection) or `"json"` (one JSON object per line).
    pub access_log: Option<AccessLogFile>,
    /// `"json"` access log lines go to this file (reopened on SIGUSR1)
    /// instead of stderr.
    pub access_log_file: Option<String>,
    /// Where operator states (drains, disables) are kept across restarts.
    pub state_file: Option<String>,
}

/// `access_log` as written: a boolean (the old form) or a format name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AccessLogFile {
    /// `true` = text, `false` = off.
    Bool(bool),
    /// `off`, `text` or `json`.
    Name(String),
}

/// `[[listener]]`: one address ringlb accepts on.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Unique name.
    pub name: Option<String>,
    /// `ip:port`.
    pub bind: Option<String>,
    /// `tcp` or `udp`.
    pub protocol: Option<String>,
    /// Name of the pool to send clients to.
    pub pool: Option<String>,
    /// `src_ip` or `src_ip_port`.
    pub hash_key: Option<String>,
    /// Backend connect timeout.
    pub connect_timeout: Option<String>,
    /// Close a connection idle this long in both directions.
    pub idle_timeout: Option<String>,
    /// Listen backlog.
    pub backlog: Option<i64>,
    /// Backends tried per connection before the client is closed.
    pub connect_attempts: Option<i64>,
    /// UDP: most flows across workers.
    pub max_flows: Option<i64>,
    /// Most open connections (UDP: flows) across workers; 0 = no limit.
    pub max_connections: Option<i64>,
    /// Most open connections from one source; 0 = no limit.
    pub max_connections_per_source: Option<i64>,
    /// `[listener.rate_limit]`
    pub rate_limit: Option<RateLimitFile>,
    /// `copy`, `splice` or `auto`.
    pub relay: Option<String>,
    /// `off`, `v1` or `v2`: PROXY protocol header to the backend.
    pub proxy_protocol: Option<String>,
    /// `balancer` or `client`: the address backends are connected to from.
    pub source: Option<String>,
    /// `[listener.token]`
    pub token: Option<super::game::TokenFile>,
    /// `off`, `v1`, `v2` or `any`: PROXY headers accepted from clients.
    pub accept_proxy: Option<String>,
    /// CIDRs allowed to send PROXY headers (required with `accept_proxy`).
    pub trusted_sources: Option<Vec<String>>,
    /// Time a client has to send its whole PROXY header.
    pub proxy_header_timeout: Option<String>,
    /// `[[listener.route]]`: pools by TLS server name.
    pub route: Option<Vec<super::preread::RouteFile>>,
    /// Time a client has to send its ClientHello.
    pub sni_timeout: Option<String>,
    /// `default` or `refuse`: not TLS, no SNI, or no route matched.
    pub sni_fallback: Option<String>,
}

/// `[listener.rate_limit]`: per-source token buckets.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// New connections (UDP: new flows) per second per source.
    pub per_source_rate: Option<f64>,
    /// Bucket size for new connections.
    pub per_source_burst: Option<i64>,
    /// UDP datagrams per second per source (0 = no packet limit).
    pub per_source_packet_rate: Option<f64>,
    /// Bucket size for datagrams.
    pub per_source_packet_burst: Option<i64>,
    /// IPv4 prefix length that makes one source.
    pub source_prefix_v4: Option<i64>,
    /// IPv6 prefix length that makes one source.
    pub source_prefix_v6: Option<i64>,
    /// Sources tracked at most.
    pub max_sources: Option<i64>,
}

/// `[[pool]]`: a set of backends and its Maglev table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// Unique name.
    pub name: Option<String>,
    /// Maglev table size; must be prime.
    pub table_size: Option<i64>,
    /// How long a drained backend's connections may continue.
    pub drain_timeout: Option<String>,
    /// Below this share of healthy weight (percent), balance over all
    /// enabled backends (panic mode).
    pub panic_threshold: Option<f64>,
    /// Ramp a recovered backend's share over this long.
    pub slow_start: Option<String>,
    /// `[pool.health_check]`: active checks.
    pub health_check: Option<HealthCheckFile>,
    /// `[pool.outlier]`: passive checks.
    pub outlier: Option<OutlierFile>,
    /// `[pool.geo]`: per client region, a multiplier per backend region.
    pub geo: Option<BTreeMap<String, BTreeMap<String, i64>>>,
    /// Percent of a region's configured weight that must stay healthy
    /// before its traffic spills to other regions.
    pub spill_threshold: Option<f64>,
    /// `maglev` (default), `least_conn` or `random_two`.
    pub balance: Option<String>,
    /// Maglev with bounded loads: skip a backend above this percent of the
    /// pool's weighted average of open connections (> 100).
    pub hash_balance_factor: Option<i64>,
    /// `keep` (default) or `close`: what happens to a backend's open
    /// connections when it goes down.
    pub on_down: Option<String>,
    /// `keep` (default) or `close_backups`: what happens to the connections
    /// on backups when a primary is usable again.
    pub on_up: Option<String>,
    /// `[[pool.backend]]`
    #[serde(default)]
    pub backend: Vec<BackendFile>,
}

/// `[pool.health_check]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    /// `tcp`, `send_expect` or `none`.
    pub kind: Option<String>,
    /// Time between checks of one backend.
    pub interval: Option<String>,
    /// Time a check may take.
    pub timeout: Option<String>,
    /// Successes in a row that bring a backend up.
    pub rise: Option<i64>,
    /// Failures in a row that take it down.
    pub fall: Option<i64>,
    /// Random spread added to each interval.
    pub jitter: Option<String>,
    /// Bytes sent after connecting (send_expect).
    pub send: Option<String>,
    /// Prefix the reply must start with (send_expect).
    pub expect: Option<String>,
    /// Check this port instead of the backend's.
    pub port: Option<i64>,
    /// `up` or `down`: state before the first check.
    pub initial_state: Option<String>,
    /// Checks running at once for this pool.
    pub max_concurrent: Option<i64>,
    /// `off`, `v1` or `v2`: open each check with a PROXY protocol header
    /// for a connection of ringlb's own (for backends that require one).
    pub send_proxy: Option<String>,
    /// http: request method (`GET`).
    pub method: Option<String>,
    /// http: request path (required).
    pub path: Option<String>,
    /// http: `Host` header (the checked address).
    pub host: Option<String>,
    /// http: a list of statuses (`[200, 204]`) or a class (`"2xx"`).
    pub expect_status: Option<toml::Value>,
    /// http: a substring the body must contain.
    pub expect_body: Option<String>,
    /// postgres (required), mysql (optional): the user the check names.
    pub user: Option<String>,
    /// postgres: database named in the startup message.
    pub database: Option<String>,
    /// redis: `master` or `replica`, checked with `ROLE`.
    pub role: Option<String>,
    /// redis: count `-NOAUTH` as up.
    pub noauth_is_up: Option<bool>,
}

/// `[pool.outlier]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    /// Connect failures in a row that eject a backend (0 = off).
    pub consecutive_failures: Option<i64>,
    /// First ejection time; doubles on each repeat.
    pub ejection_time: Option<String>,
    /// Cap of the ejection time.
    pub max_ejection_time: Option<String>,
    /// Most of a pool (percent of backends) ejected at once.
    pub max_ejection_percent: Option<f64>,
}

/// `[[pool.backend]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// `ip:port`.
    pub addr: Option<String>,
    /// Relative share; default 1; 0 = configured but takes no new connections.
    pub weight: Option<i64>,
    /// Address health checks go to instead of `addr`.
    pub check_addr: Option<String>,
    /// Most open connections to this backend; 0 = no limit.
    pub max_connections: Option<i64>,
    /// Region the backend runs in (geo pools).
    pub region: Option<String>,
    /// A backup: takes connections only while no primary of its pool is usable.
    pub backup: Option<bool>,
}

/// The largest file ringlb reads as configuration: the config file itself
/// and `geo.prefixes_file`. A full GeoIP country CSV is a few MiB; the cap
/// only stops a mistake (`/dev/zero`, a log file) from eating the memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads a configuration input as text: a regular file of at most
/// [`MAX_FILE_BYTES`], or an error in words (without the path; the caller
/// names the file and the key).
///
/// The file is opened with `O_NONBLOCK` so that a FIFO nobody writes to
/// cannot block the open (and with it the control plane on reload); fstat
/// then refuses anything that is not a regular file (FIFOs, devices such as
/// `/dev/zero`, directories, sockets). The cap is enforced while reading as
/// well, so a file that grows while it is read stays capped.
pub fn read_bounded(path: &std::path::Path) -> Result<String, String> {
    String::from_utf8(read_bounded_bytes(path)?).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// Like [`read_bounded`], without the UTF-8 check (the caller places the
/// error).
pub fn read_bounded_bytes(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let limit = format!("larger than the {} MiB limit", MAX_FILE_BYTES >> 20);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(format!("not a regular file ({what})"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(limit);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(limit);
    }
    Ok(bytes)
}
