//! Configuration: TOML file → raw structs → one validated, typed [`Config`].
//!
//! The same validation serves the file at start, reloads and control commands,
//! so a setting that could never start ringlb can never be applied at runtime.

mod duration;
mod error;
pub mod file;

pub use duration::{format_duration, parse_duration};
pub use error::{ConfigError, ConfigErrors};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::maglev;
use file::{BackendFile, ConfigFile, ListenerFile, PoolFile};

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
    entries: Vec<(crate::geo::Cidr, crate::geo::RegionId)>,
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
    /// Log one line per connection at info.
    pub access_log: bool,
    /// Operator states kept across restarts and upgrades (relative paths
    /// are resolved against the config file's directory).
    pub state_file: Option<PathBuf>,
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
    /// PROXY protocol header sent to the backend first.
    pub proxy_protocol: ProxyProtocol,
}

/// Whether, and in which version, a TCP listener tells its backends the
/// client's address with a PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// No header: backends see ringlb's address.
    Off,
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
}

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
    pub connections: crate::admission::BucketParams,
    /// UDP datagrams per source (None = no packet limit).
    pub packets: Option<crate::admission::BucketParams>,
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
    /// Backends, in file order.
    pub backends: Vec<BackendConfig>,
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
}

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
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let bytes =
            file::read_bounded_bytes(path).map_err(|e| ConfigErrors(vec![ConfigError::new(path, "file", e)]))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            // Placed like a TOML error: the line and column of the first bad byte.
            let valid = e.utf8_error().valid_up_to();
            let prefix = std::str::from_utf8(&e.as_bytes()[..valid]).unwrap_or_default();
            let problem = format!("not valid UTF-8 (byte 0x{:02x})", e.as_bytes()[valid]);
            ConfigErrors(vec![ConfigError::new(path, line_col(prefix, valid), problem)])
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let place = match e.span() {
                Some(span) => line_col(text, span.start),
                None => "file".to_string(),
            };
            let mut problem = e.message().trim().to_string();
            if problem.is_empty() {
                // toml gives no message for some syntax errors, e.g. a control character
                // in a comment; name what is at the spot rather than print nothing.
                let at = e
                    .span()
                    .and_then(|s| text.get(s.start..))
                    .and_then(|t| t.chars().next());
                problem = match at {
                    Some(c) if c.is_control() => {
                        format!("invalid character {c:?} (control characters are not allowed)")
                    }
                    Some(c) => format!("invalid TOML at {c:?}"),
                    None => "invalid TOML".to_string(),
                };
            }
            ConfigErrors(vec![ConfigError::new(path, place, problem)])
        })?;
        validate(file, path)
    }

    /// What can be known about this host without starting anything, for
    /// `check` and `run` (after [`Config::load`]): every listener and the
    /// metrics endpoint on an address this host has, the control socket
    /// path usable (short enough, not some other file, its directory there
    /// or creatable), and io_uring available when `io_engine = "uring"`.
    /// Nothing is bound, created or kept. Ports are not probed: the running
    /// ringlb a config is checked for usually holds them.
    pub fn check_host(&self) -> Result<(), ConfigErrors> {
        let file = self.source.as_deref().unwrap_or(Path::new("<embedded>"));
        let mut errors = Vec::new();
        let mut err = |place: String, problem: String| errors.push(ConfigError::new(file, place, problem));
        for l in &self.listeners {
            let ty = match l.protocol {
                Protocol::Tcp => socket2::Type::STREAM,
                Protocol::Udp => socket2::Type::DGRAM,
            };
            if let Err(e) = address_is_local(l.bind, ty) {
                err(
                    format!("listener \"{}\": bind", l.name),
                    format!("{}: cannot bind here: {e}", l.bind),
                );
            }
        }
        if let Some(m) = self.control.metrics {
            if let Err(e) = address_is_local(m, socket2::Type::STREAM) {
                err("control.metrics".into(), format!("{m}: cannot bind here: {e}"));
            }
        }
        if let Some(path) = &self.control.socket {
            if let Err(problem) = control_socket_usable(path) {
                err("control.socket".into(), problem);
            }
        }
        if let Some(path) = &self.control.state_file {
            if let Err(problem) = crate::state_file::usable(path) {
                err("control.state_file".into(), problem);
            }
        }
        if let Err(e) = crate::engine::resolve_engine(self.runtime.io_engine) {
            err("runtime.io_engine".into(), e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// A one-line summary, as printed by `ringlb check`.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        format!(
            "{} listener(s), {} pool(s), {} backend(s), {} worker(s)",
            self.listeners.len(),
            self.pools.len(),
            backends,
            self.runtime.workers
        )
    }
}

/// Binds a throwaway socket to `addr`'s IP on an ephemeral port: fails
/// (EADDRNOTAVAIL) when this host does not have the address, whoever holds
/// the port itself.
fn address_is_local(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.bind(&SocketAddr::new(addr.ip(), 0).into())
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

/// Whether ringlb could create its control socket at `path` at start.
fn control_socket_usable(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().len() > MAX_UNIX_PATH {
        return Err(format!(
            "longer than the {MAX_UNIX_PATH} bytes a Unix socket path may have: {}",
            path.display()
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // A stale socket is replaced at start; anything else would be deleted.
        return if meta.file_type().is_socket() {
            Ok(())
        } else {
            Err(format!(
                "{}: exists and is not a socket (ringlb only replaces a stale socket)",
                path.display()
            ))
        };
    }
    // The directory is created at start when missing: the nearest existing
    // ancestor must be a directory ringlb can create entries in.
    let mut dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    loop {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(format!("{}: not a directory", dir.display())),
            Err(_) => match dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(up) => dir = up,
                None => return Ok(()),
            },
        }
    }
    let c_dir =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: access() with a valid NUL-terminated path.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!(
            "{}: cannot create the socket there: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

/// Collects errors while validating so that one run reports them all.
struct Checker<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
    /// Region names met so far ("default" is always there).
    names: crate::geo::RegionNames,
}

impl Checker<'_> {
    fn err(&mut self, place: &str, problem: impl Into<String>) {
        self.errors.push(ConfigError::new(self.file, place, problem));
    }

    fn duration(&mut self, place: &str, key: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => parse_duration(s).unwrap_or_else(|e| {
                self.err(&format!("{place}{key}"), e);
                default
            }),
        }
    }

    /// `off` (or absent), `v1` or `v2`.
    fn proxy_protocol(&mut self, place: &str, key: &str, v: &Option<String>) -> ProxyProtocol {
        match v.as_deref() {
            None | Some("off") => ProxyProtocol::Off,
            Some("v1") => ProxyProtocol::V1,
            Some("v2") => ProxyProtocol::V2,
            Some(other) => {
                self.err(&format!("{place}{key}"), format!("\"{other}\": expected off, v1 or v2"));
                ProxyProtocol::Off
            }
        }
    }

    fn addr(&mut self, place: &str, key: &str, v: &Option<String>) -> Option<SocketAddr> {
        match v {
            None => {
                self.err(&format!("{place}{key}"), "missing (expected \"ip:port\")");
                None
            }
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => {
                    self.err(&format!("{place}{key}"), format!("\"{s}\": port 0 is not allowed"));
                    None
                }
                Ok(a) => Some(a),
                Err(_) => {
                    self.err(
                        &format!("{place}{key}"),
                        format!("\"{s}\" is not an ip:port address (e.g. \"127.0.0.1:9001\" or \"[::1]:9001\")"),
                    );
                    None
                }
            },
        }
    }

    fn name(&mut self, place: &str, v: &Option<String>) -> Option<String> {
        match v.as_deref() {
            None => {
                self.err(&format!("{place}name"), "missing");
                None
            }
            Some(n)
                if n.is_empty()
                    || n.len() > 64
                    || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                self.err(
                    &format!("{place}name"),
                    format!("\"{n}\": use 1-64 letters, digits, '-', '_' or '.'"),
                );
                None
            }
            Some(n) => Some(n.to_string()),
        }
    }

    fn region(&mut self, place: &str, name: &str) -> Option<crate::geo::RegionId> {
        match self.names.intern(name) {
            Ok(id) => Some(id),
            Err(e) => {
                self.err(place, format!("region \"{name}\": {e}"));
                None
            }
        }
    }

    fn ranged(&mut self, place: &str, v: Option<i64>, min: i64, max: i64, default: i64) -> i64 {
        match v {
            None => default,
            Some(x) if x < min || x > max => {
                self.err(place, format!("{x} is out of range ({min}..={max})"));
                default
            }
            Some(x) => x,
        }
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Validates a parsed file into a [`Config`], reporting every problem.
pub fn validate(file: ConfigFile, path: &Path) -> Result<Config, ConfigErrors> {
    let mut c = Checker {
        file: path,
        errors: Vec::new(),
        names: crate::geo::RegionNames::new(),
    };
    let geo_entries = file.geo.as_ref().map(|g| load_geo(&mut c, path, g)).unwrap_or_default();

    let rt = &file.runtime;
    let workers = c.ranged("runtime.workers", rt.workers, 1, 1024, online_cpus() as i64) as usize;
    let io_engine = match rt.io_engine.as_deref() {
        None | Some("auto") => IoEngineChoice::Auto,
        Some("uring") => IoEngineChoice::Uring,
        Some("epoll") => IoEngineChoice::Epoll,
        Some(other) => {
            c.err(
                "runtime.io_engine",
                format!("\"{other}\": expected auto, uring or epoll"),
            );
            IoEngineChoice::Auto
        }
    };
    let shutdown_timeout = c.duration(
        "runtime.",
        "shutdown_timeout",
        &rt.shutdown_timeout,
        Duration::from_secs(30),
    );
    let runtime = RuntimeConfig {
        workers,
        io_engine,
        pin_workers: rt.pin_workers.unwrap_or(false),
        shutdown_timeout,
    };

    if file.control.socket.as_deref() == Some("") {
        c.err("control.socket", "empty path");
    }
    let control = ControlConfig {
        socket: file.control.socket.as_ref().map(PathBuf::from),
        metrics: file
            .control
            .metrics
            .as_ref()
            .and_then(|_| c.addr("control.", "metrics", &file.control.metrics)),
        access_log: file.control.access_log.unwrap_or(false),
        state_file: match file.control.state_file.as_deref() {
            None => None,
            Some("") => {
                c.err("control.state_file", "empty path");
                None
            }
            Some(f) => Some(path.parent().unwrap_or(Path::new(".")).join(f)),
        },
    };

    let mut pools = Vec::new();
    let mut pool_names = HashSet::new();
    for (i, p) in file.pool.iter().enumerate() {
        let label = p
            .name
            .as_deref()
            .map_or(format!("pool {}", i + 1), |n| format!("pool \"{n}\""));
        if let Some(pool) = validate_pool(&mut c, &label, p) {
            if !pool_names.insert(pool.name.clone()) {
                c.err(&format!("{label}: name"), "duplicate pool name");
            }
            pools.push(pool);
        }
    }

    let mut listeners: Vec<ListenerConfig> = Vec::new();
    let mut names = HashSet::new();
    for (i, l) in file.listener.iter().enumerate() {
        let label = l
            .name
            .as_deref()
            .map_or(format!("listener {}", i + 1), |n| format!("listener \"{n}\""));
        let Some(lc) = validate_listener(&mut c, &label, l) else {
            continue;
        };
        if !names.insert(lc.name.clone()) {
            c.err(&format!("{label}: name"), "duplicate listener name");
        }
        if let Some(other) = listeners
            .iter()
            .find(|o| o.protocol == lc.protocol && addresses_overlap(o.bind, lc.bind))
        {
            c.err(&format!("{label}: bind"), address_conflict(lc.bind, other));
        }
        if !pool_names.contains(&lc.pool) {
            c.err(&format!("{label}: pool"), format!("no pool named \"{}\"", lc.pool));
        }
        listeners.push(lc);
    }

    if let Some(m) = control.metrics {
        // The metrics endpoint is a TCP listener of its own.
        if let Some(other) = listeners
            .iter()
            .find(|o| o.protocol == Protocol::Tcp && addresses_overlap(o.bind, m))
        {
            c.err("control.metrics", address_conflict(m, other));
        }
    }

    // Like HAProxy, a config that would serve nothing is an error: it is
    // what an empty or truncated file looks like, and on reload it would
    // close every port. (A pool that no listener uses is allowed.)
    if file.listener.is_empty() {
        c.err(
            "listener",
            "no [[listener]]: ringlb would serve nothing (is the file empty or cut short?)",
        );
    }

    let geo = build_geo(&mut c, geo_entries);
    if c.errors.is_empty() {
        Ok(Config {
            source: Some(path.to_path_buf()),
            runtime,
            control,
            listeners,
            pools,
            geo,
        })
    } else {
        Err(ConfigErrors(c.errors))
    }
}

/// Whether two sockets of one protocol could not both be bound: the same
/// port and family, and the same address or a wildcard (`0.0.0.0`, `::`)
/// on either side, which takes the port on every address of its family.
/// (IPv6 sockets are v6-only, so `0.0.0.0` and `::` do not overlap.)
pub fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn address_conflict(addr: SocketAddr, other: &ListenerConfig) -> String {
    if addr == other.bind {
        format!("{addr} is already used by listener \"{}\"", other.name)
    } else {
        format!(
            "{addr} overlaps listener \"{}\" on {} (a wildcard address takes the port on every address of its family)",
            other.name, other.bind
        )
    }
}

fn validate_listener(c: &mut Checker<'_>, label: &str, l: &ListenerFile) -> Option<ListenerConfig> {
    let place = format!("{label}: ");
    let name = c.name(&place, &l.name);
    let mut bind = c.addr(&place, "bind", &l.bind);
    // Listener sockets on IPv6 are IPv6-only (IPv4 has its own listeners),
    // and such a socket cannot bind an IPv4-mapped address.
    if let Some(SocketAddr::V6(v6)) = bind {
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            c.err(
                &format!("{place}bind"),
                format!(
                    "{v6}: an IPv4-mapped address; use {v4}:{} (IPv6 listeners are IPv6-only)",
                    v6.port()
                ),
            );
            bind = None;
        }
    }
    let protocol = match l.protocol.as_deref() {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            c.err(&format!("{place}protocol"), format!("\"{other}\": expected tcp or udp"));
            Protocol::Tcp
        }
    };
    let pool = match &l.pool {
        Some(p) => p.clone(),
        None => {
            c.err(&format!("{place}pool"), "missing");
            String::new()
        }
    };
    let hash_key = match l.hash_key.as_deref() {
        None | Some("src_ip_port") => HashKey::SrcIpPort,
        Some("src_ip") => HashKey::SrcIp,
        Some(other) => {
            c.err(
                &format!("{place}hash_key"),
                format!("\"{other}\": expected src_ip or src_ip_port"),
            );
            HashKey::SrcIpPort
        }
    };
    let connect_timeout = c.duration(&place, "connect_timeout", &l.connect_timeout, Duration::from_secs(2));
    if connect_timeout.is_zero() {
        c.err(&format!("{place}connect_timeout"), "must be more than 0");
    }
    // UDP flows idle out sooner by default (Envoy's udp_proxy uses 60s too).
    let default_idle = if protocol == Protocol::Udp {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(300)
    };
    let idle_timeout = c.duration(&place, "idle_timeout", &l.idle_timeout, default_idle);
    if idle_timeout.is_zero() {
        c.err(&format!("{place}idle_timeout"), "must be more than 0");
    }
    let backlog = c.ranged(
        &format!("{place}backlog"),
        l.backlog,
        1,
        1 << 20,
        DEFAULT_BACKLOG as i64,
    ) as u32;
    let connect_attempts = c.ranged(
        &format!("{place}connect_attempts"),
        l.connect_attempts,
        1,
        MAX_CONNECT_ATTEMPTS as i64,
        3,
    ) as u32;
    let max_flows = c.ranged(&format!("{place}max_flows"), l.max_flows, 1, 100_000_000, 1_000_000) as usize;
    if l.max_flows.is_some() && protocol == Protocol::Tcp {
        c.err(&format!("{place}max_flows"), "only applies to protocol = \"udp\"");
    }
    let max_connections = c.ranged(&format!("{place}max_connections"), l.max_connections, 0, 100_000_000, 0) as u64;
    let max_connections_per_source = c.ranged(
        &format!("{place}max_connections_per_source"),
        l.max_connections_per_source,
        0,
        100_000_000,
        0,
    ) as u64;
    let rate_limit = l
        .rate_limit
        .as_ref()
        .and_then(|r| validate_rate_limit(c, &format!("{place}rate_limit."), r, protocol));
    let relay = match l.relay.as_deref() {
        Some("copy") => RelayMode::Copy,
        Some("splice") => RelayMode::Splice,
        None | Some("auto") => RelayMode::Auto,
        Some(other) => {
            c.err(
                &format!("{place}relay"),
                format!("\"{other}\": expected copy, splice or auto"),
            );
            RelayMode::Copy
        }
    };
    if l.relay.is_some() && protocol == Protocol::Udp {
        c.err(&format!("{place}relay"), "only applies to protocol = \"tcp\"");
    }
    let proxy_protocol = c.proxy_protocol(&place, "proxy_protocol", &l.proxy_protocol);
    if proxy_protocol != ProxyProtocol::Off && protocol == Protocol::Udp {
        c.err(&format!("{place}proxy_protocol"), "only applies to protocol = \"tcp\"");
    }
    Some(ListenerConfig {
        relay,
        proxy_protocol,
        max_flows,
        max_connections,
        max_connections_per_source,
        rate_limit,
        name: name?,
        bind: bind?,
        protocol,
        pool,
        hash_key,
        connect_timeout,
        idle_timeout,
        backlog,
        connect_attempts,
    })
}

fn validate_pool(c: &mut Checker<'_>, label: &str, p: &PoolFile) -> Option<PoolConfig> {
    let place = format!("{label}: ");
    let name = c.name(&place, &p.name);
    let table_size = c.ranged(
        &format!("{place}table_size"),
        p.table_size,
        7,
        16_777_259,
        maglev::DEFAULT_TABLE_SIZE as i64,
    ) as usize;
    if !maglev::is_prime(table_size as u64) {
        c.err(
            &format!("{place}table_size"),
            format!("{table_size} is not prime (e.g. 65537, 131071, 655373)"),
        );
    }
    let drain_timeout = c.duration(&place, "drain_timeout", &p.drain_timeout, Duration::from_secs(30));
    let panic_threshold = match p.panic_threshold {
        None => 0.5,
        Some(x) if (0.0..=100.0).contains(&x) => x / 100.0,
        Some(x) => {
            c.err(
                &format!("{place}panic_threshold"),
                format!("{x} is not a percentage (0..=100; 0 = never panic)"),
            );
            0.5
        }
    };
    let slow_start = c.duration(&place, "slow_start", &p.slow_start, Duration::ZERO);
    let health_check = match &p.health_check {
        None => HealthCheckConfig::default(),
        Some(h) => validate_health_check(c, &format!("{place}health_check."), h),
    };
    let outlier = match &p.outlier {
        None => OutlierConfig::default(),
        Some(o) => validate_outlier(c, &format!("{place}outlier."), o),
    };
    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for (i, b) in p.backend.iter().enumerate() {
        let bplace = format!("{place}backend {}: ", i + 1);
        if let Some(bc) = validate_backend(c, &bplace, b) {
            if !seen.insert(bc.addr) {
                c.err(
                    &format!("{bplace}addr"),
                    format!("{} is listed twice in this pool", bc.addr),
                );
            }
            backends.push(bc);
        }
    }
    // Backends that failed their own validation are reported already; the
    // pool rules then look at the valid ones (none valid: nothing to add).
    if p.backend.is_empty() || !backends.is_empty() {
        let members: Vec<PoolMember> = backends
            .iter()
            .map(|b| PoolMember {
                weight: b.weight,
                in_service: true,
            })
            .collect();
        for (key, problem) in pool_rule_problems(&members, table_size) {
            c.err(&format!("{place}{key}"), problem);
        }
    }
    let geo = p
        .geo
        .as_ref()
        .map(|rows| validate_pool_geo(c, &place, rows, p.spill_threshold));
    if geo.is_none() && p.spill_threshold.is_some() {
        c.err(
            &format!("{place}spill_threshold"),
            "only applies to a pool with [pool.geo]",
        );
    }
    if geo.is_some() {
        for (i, b) in backends.iter().enumerate() {
            if b.region.is_none() {
                c.err(
                    &format!("{place}backend {}: region", i + 1),
                    "missing: every backend of a [pool.geo] pool needs a region",
                );
            }
        }
    }
    Some(PoolConfig {
        name: name?,
        table_size,
        drain_timeout,
        panic_threshold,
        slow_start,
        health_check,
        outlier,
        geo,
        backends,
    })
}

/// One backend as the pool rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMember {
    /// Configured weight.
    pub weight: u32,
    /// Takes new connections by operator intent (not drained or disabled;
    /// health says nothing here: a backend that is down comes back by itself).
    pub in_service: bool,
}

/// The rules on a pool's set of backends, as `(key, problem)` pairs: at
/// least one backend, at least one with weight > 0 in service, no more than
/// `table_size`. One function for the file and for control commands (applied
/// to the pool as the command would leave it), so a pool that could never
/// start can never be made at runtime by mistake either.
pub fn pool_rule_problems(members: &[PoolMember], table_size: usize) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if members.is_empty() {
        problems.push(("backend", "a pool needs at least one [[pool.backend]]".to_string()));
    } else if !members.iter().any(|m| m.weight > 0 && m.in_service) {
        let problem = if members.iter().all(|m| m.in_service) {
            "every backend has weight 0: the pool could never take a connection"
        } else {
            "every backend has weight 0 or is drained or disabled: the pool could never take a connection"
        };
        problems.push(("backend", problem.to_string()));
    }
    if members.len() > table_size {
        problems.push((
            "table_size",
            format!("{table_size} is smaller than the {} backends", members.len()),
        ));
    }
    problems
}

/// Validates one backend entry; shared with `ctl add`.
fn validate_backend(c: &mut Checker<'_>, place: &str, b: &BackendFile) -> Option<BackendConfig> {
    let addr = c.addr(place, "addr", &b.addr);
    let weight = c.ranged(&format!("{place}weight"), b.weight, 0, 1_000_000, 1) as u32;
    let check_addr = match &b.check_addr {
        None => None,
        Some(_) => Some(c.addr(place, "check_addr", &b.check_addr)?),
    };
    let max_connections = c.ranged(&format!("{place}max_connections"), b.max_connections, 0, 100_000_000, 0) as u64;
    let region = b.region.as_deref().and_then(|r| c.region(&format!("{place}region"), r));
    Some(BackendConfig {
        addr: addr?,
        weight,
        check_addr,
        max_connections,
        region,
    })
}

fn validate_rate_limit(
    c: &mut Checker<'_>,
    place: &str,
    r: &file::RateLimitFile,
    protocol: Protocol,
) -> Option<RateLimitConfig> {
    use crate::admission::BucketParams;
    let mut bucket = |rate_key: &str, rate: Option<f64>, burst_key: &str, burst: Option<i64>| -> Option<BucketParams> {
        let rate = rate?;
        let burst = c.ranged(
            &format!("{place}{burst_key}"),
            burst,
            1,
            1_000_000_000,
            (rate.ceil() as i64).max(1),
        );
        match BucketParams::new(rate, burst as u32) {
            Ok(p) => Some(p),
            Err(e) => {
                c.err(&format!("{place}{rate_key}"), format!("{rate}: {e}"));
                None
            }
        }
    };
    let connections = bucket(
        "per_source_rate",
        r.per_source_rate,
        "per_source_burst",
        r.per_source_burst,
    );
    let packets = match r.per_source_packet_rate {
        Some(0.0) => None,
        rate => bucket(
            "per_source_packet_rate",
            rate,
            "per_source_packet_burst",
            r.per_source_packet_burst,
        ),
    };
    if packets.is_some() && protocol == Protocol::Tcp {
        c.err(
            &format!("{place}per_source_packet_rate"),
            "only applies to protocol = \"udp\"",
        );
    }
    if r.per_source_rate.is_none() {
        c.err(
            &format!("{place}per_source_rate"),
            "missing (new connections or flows per second per source)",
        );
    }
    let prefix_v4 = c.ranged(&format!("{place}source_prefix_v4"), r.source_prefix_v4, 1, 32, 32) as u8;
    let prefix_v6 = c.ranged(&format!("{place}source_prefix_v6"), r.source_prefix_v6, 1, 128, 64) as u8;
    let max_sources = c.ranged(
        &format!("{place}max_sources"),
        r.max_sources,
        64,
        100_000_000,
        1_000_000,
    ) as usize;
    Some(RateLimitConfig {
        connections: connections?,
        packets,
        prefix_v4,
        prefix_v6,
        max_sources,
    })
}

fn validate_health_check(c: &mut Checker<'_>, place: &str, h: &file::HealthCheckFile) -> HealthCheckConfig {
    let d = HealthCheckConfig::default();
    let kind = match h.kind.as_deref() {
        None | Some("tcp") => CheckKind::Tcp,
        Some("none") => CheckKind::None,
        Some(kind @ ("send_expect" | "udp_send_expect")) => match &h.expect {
            Some(expect) if !expect.is_empty() => {
                let send = h.send.clone().unwrap_or_default().into_bytes();
                let expect = expect.clone().into_bytes();
                if kind == "send_expect" {
                    CheckKind::SendExpect { send, expect }
                } else {
                    CheckKind::UdpSendExpect { send, expect }
                }
            }
            _ => {
                c.err(
                    &format!("{place}expect"),
                    format!("kind = \"{kind}\" needs a non-empty expect"),
                );
                CheckKind::Tcp
            }
        },
        Some(other) => {
            c.err(
                &format!("{place}kind"),
                format!("\"{other}\": expected tcp, send_expect, udp_send_expect or none"),
            );
            CheckKind::Tcp
        }
    };
    if !matches!(kind, CheckKind::SendExpect { .. } | CheckKind::UdpSendExpect { .. })
        && (h.send.is_some() || h.expect.is_some())
    {
        c.err(
            &format!("{place}send"),
            "send/expect only apply to kind = \"send_expect\" or \"udp_send_expect\"",
        );
    }
    // A backend that requires a PROXY header (HAProxy's check-send-proxy):
    // the check opens with the "connection of our own" header.
    let send_proxy = c.proxy_protocol(place, "send_proxy", &h.send_proxy);
    let kind = match (crate::proxy::proxy_protocol::local_header(send_proxy), kind) {
        (None, kind) => kind,
        (Some(header), CheckKind::Tcp) => CheckKind::SendExpect {
            send: header.bytes().to_vec(),
            expect: Vec::new(),
        },
        (Some(header), CheckKind::SendExpect { send, expect }) => CheckKind::SendExpect {
            send: [header.bytes(), &send].concat(),
            expect,
        },
        (Some(_), kind) => {
            c.err(
                &format!("{place}send_proxy"),
                "only applies to kind = \"tcp\" or \"send_expect\"",
            );
            kind
        }
    };
    let interval = c.duration(place, "interval", &h.interval, d.interval);
    if interval < Duration::from_millis(10) {
        c.err(&format!("{place}interval"), "must be at least 10ms");
    }
    let timeout = c.duration(place, "timeout", &h.timeout, d.timeout);
    if timeout.is_zero() {
        c.err(&format!("{place}timeout"), "must be more than 0");
    }
    let jitter = c.duration(place, "jitter", &h.jitter, interval / 5);
    let initially_up = match h.initial_state.as_deref() {
        None | Some("up") => true,
        Some("down") => false,
        Some(other) => {
            c.err(
                &format!("{place}initial_state"),
                format!("\"{other}\": expected up or down"),
            );
            true
        }
    };
    HealthCheckConfig {
        kind,
        interval,
        timeout,
        rise: c.ranged(&format!("{place}rise"), h.rise, 1, 1000, 2) as u32,
        fall: c.ranged(&format!("{place}fall"), h.fall, 1, 1000, 3) as u32,
        jitter,
        port: h
            .port
            .map(|p| c.ranged(&format!("{place}port"), Some(p), 1, 65535, 1) as u16),
        initially_up,
        max_concurrent: c.ranged(&format!("{place}max_concurrent"), h.max_concurrent, 1, 10_000, 64) as usize,
    }
}

fn validate_outlier(c: &mut Checker<'_>, place: &str, o: &file::OutlierFile) -> OutlierConfig {
    let d = OutlierConfig::default();
    let ejection_time = c.duration(place, "ejection_time", &o.ejection_time, d.ejection_time);
    let max_ejection_time = c.duration(
        place,
        "max_ejection_time",
        &o.max_ejection_time,
        d.max_ejection_time.max(ejection_time),
    );
    if max_ejection_time < ejection_time {
        c.err(&format!("{place}max_ejection_time"), "is shorter than ejection_time");
    }
    let max_ejection_share = match o.max_ejection_percent {
        None => d.max_ejection_share,
        Some(x) if (0.0..=100.0).contains(&x) => x / 100.0,
        Some(x) => {
            c.err(
                &format!("{place}max_ejection_percent"),
                format!("{x} is not a percentage (0..=100)"),
            );
            d.max_ejection_share
        }
    };
    OutlierConfig {
        consecutive_failures: c.ranged(
            &format!("{place}consecutive_failures"),
            o.consecutive_failures,
            0,
            1_000_000,
            5,
        ) as u32,
        ejection_time,
        max_ejection_time,
        max_ejection_share,
    }
}

/// Loads `[geo]`: the prefixes file (relative to the config file) and the
/// inline prefixes, interning their region names.
fn load_geo(
    c: &mut Checker<'_>,
    config_path: &Path,
    g: &file::GeoFile,
) -> Vec<(crate::geo::Cidr, crate::geo::RegionId)> {
    let mut raw: Vec<(crate::geo::Cidr, String)> = Vec::new();
    if let Some(f) = &g.prefixes_file {
        let path = config_path.parent().unwrap_or(Path::new(".")).join(f);
        match file::read_bounded(&path) {
            Err(e) => c.err("geo.prefixes_file", format!("{}: {e}", path.display())),
            Ok(text) => match crate::geo::parse_prefixes(&text, &path.display().to_string()) {
                Ok(entries) => raw.extend(entries),
                Err(errors) => {
                    for e in errors {
                        c.err("geo.prefixes_file", e.to_string());
                    }
                }
            },
        }
    }
    for (cidr, region) in g.prefixes.iter().flatten() {
        match cidr.parse::<crate::geo::Cidr>() {
            Ok(parsed) => raw.push((parsed, region.clone())),
            Err(e) => c.err(&format!("geo.prefixes.\"{cidr}\""), e.to_string()),
        }
    }
    raw.into_iter()
        .filter_map(|(cidr, name)| Some((cidr, c.region(&format!("geo: {cidr}"), &name)?)))
        .collect()
}

fn build_geo(c: &mut Checker<'_>, entries: Vec<(crate::geo::Cidr, crate::geo::RegionId)>) -> GeoConfig {
    let names = std::mem::take(&mut c.names);
    match crate::geo::RegionMap::new(entries.clone(), crate::geo::RegionNames::DEFAULT) {
        Ok(map) => GeoConfig {
            names: Arc::new(names),
            map: Arc::new(map),
            entries,
        },
        Err(e) => {
            c.err("geo", e.to_string());
            GeoConfig::default()
        }
    }
}

fn validate_pool_geo(
    c: &mut Checker<'_>,
    place: &str,
    rows: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>>,
    spill: Option<f64>,
) -> PoolGeo {
    let mut out = Vec::new();
    for (client, mults) in rows {
        let Some(client_id) = c.region(&format!("{place}geo.{client}"), client) else {
            continue;
        };
        let mut row = Vec::new();
        for (backend_region, m) in mults {
            let Some(id) = c.region(&format!("{place}geo.{client}.{backend_region}"), backend_region) else {
                continue;
            };
            let m = c.ranged(
                &format!("{place}geo.{client}.{backend_region}"),
                Some(*m),
                0,
                1_000_000,
                0,
            ) as u32;
            row.push((id, m));
        }
        out.push((client_id, row));
    }
    let spill_threshold = match spill {
        None => crate::geo::SpillThreshold::default(),
        Some(pct) => crate::geo::SpillThreshold::new(pct / 100.0).unwrap_or_else(|_| {
            c.err(
                &format!("{place}spill_threshold"),
                format!("{pct} is not a percentage in (0, 100]"),
            );
            crate::geo::SpillThreshold::default()
        }),
    };
    PoolGeo {
        rows: out,
        spill_threshold,
    }
}

/// Validates a backend given by a control command (`ctl add` / `ctl weight`),
/// with the same rules as the file.
pub fn validate_backend_request(addr: &str, weight: Option<i64>) -> Result<BackendConfig, ConfigErrors> {
    let mut c = Checker {
        file: Path::new("<control>"),
        errors: Vec::new(),
        names: crate::geo::RegionNames::new(),
    };
    let b = validate_backend(
        &mut c,
        "backend: ",
        &BackendFile {
            addr: Some(addr.to_string()),
            weight,
            check_addr: None,
            max_connections: None,
            region: None,
        },
    );
    match b {
        Some(b) if c.errors.is_empty() => Ok(b),
        _ => Err(ConfigErrors(c.errors)),
    }
}

#[cfg(test)]
mod tests;
