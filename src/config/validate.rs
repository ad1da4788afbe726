//! Validation: a parsed [`super::file::ConfigFile`] into a typed
//! [`Config`], every problem reported with its file, place and problem;
//! and the rules control commands share with the file (pool rules, a
//! backend given on the command line).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::file::{self, BackendFile, ConfigFile, ListenerFile, PoolFile};
use super::types::*;
use super::{parse_duration, ConfigError, ConfigErrors};
use crate::maglev;

/// Collects errors while validating so that one run reports them all.
pub(super) struct Checker<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
    /// Region names met so far ("default" is always there).
    names: crate::geo::RegionNames,
}

impl Checker<'_> {
    pub(super) fn err(&mut self, place: &str, problem: impl Into<String>) {
        self.errors.push(ConfigError::new(self.file, place, problem));
    }

    pub(super) fn duration(&mut self, place: &str, key: &str, v: &Option<String>, default: Duration) -> Duration {
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

    pub(super) fn ranged(&mut self, place: &str, v: Option<i64>, min: i64, max: i64, default: i64) -> i64 {
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
/// The `[geo] prefixes_file` as the loader read it (the file named relative
/// to the config file, at most the config size limit): validation is pure
/// and never opens a file itself.
#[derive(Debug, Clone)]
pub struct PrefixesFile {
    /// Where it was read from (named in errors).
    pub path: PathBuf,
    /// Its text, or why it could not be read.
    pub text: Result<String, String>,
}

impl PrefixesFile {
    /// Reads the prefixes file `file` names, if any, relative to the config
    /// file at `config_path` (the loader's I/O, before [`validate`]).
    pub fn read(file: &ConfigFile, config_path: &Path) -> Option<PrefixesFile> {
        let name = file.geo.as_ref()?.prefixes_file.as_ref()?;
        let path = config_path.parent().unwrap_or(Path::new(".")).join(name);
        let text = file::read_bounded(&path).map_err(|e| e.to_string());
        Some(PrefixesFile { path, text })
    }
}

/// Validates a parsed file into a [`Config`], reporting every problem;
/// `prefixes` is the `[geo] prefixes_file` the loader read
/// ([`PrefixesFile::read`]). No I/O.
pub fn validate(file: ConfigFile, path: &Path, prefixes: Option<PrefixesFile>) -> Result<Config, ConfigErrors> {
    let mut c = Checker {
        file: path,
        errors: Vec::new(),
        names: crate::geo::RegionNames::new(),
    };
    let geo_entries = file
        .geo
        .as_ref()
        .map(|g| load_geo(&mut c, g, prefixes))
        .unwrap_or_default();

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
        access_log: match &file.control.access_log {
            None | Some(file::AccessLogFile::Bool(false)) => AccessLog::Off,
            Some(file::AccessLogFile::Bool(true)) => AccessLog::Text,
            Some(file::AccessLogFile::Name(n)) => match n.as_str() {
                "off" => AccessLog::Off,
                "text" => AccessLog::Text,
                "json" => AccessLog::Json,
                other => {
                    c.err(
                        "control.access_log",
                        format!("\"{other}\": expected off, text or json (or true/false)"),
                    );
                    AccessLog::Off
                }
            },
        },
        access_log_file: match file.control.access_log_file.as_deref() {
            None => None,
            Some("") => {
                c.err("control.access_log_file", "empty path");
                None
            }
            Some(p) => Some(PathBuf::from(p)),
        },
        state_file: match file.control.state_file.as_deref() {
            None => None,
            Some("") => {
                c.err("control.state_file", "empty path");
                None
            }
            Some(f) => Some(path.parent().unwrap_or(Path::new(".")).join(f)),
        },
    };
    if control.access_log_file.is_some() && control.access_log != AccessLog::Json {
        c.err("control.access_log_file", "only applies with access_log = \"json\"");
    }

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
        for (i, r) in l.route.iter().flatten().enumerate() {
            match &r.pool {
                Some(p) if !p.is_empty() && !pool_names.contains(p) => {
                    c.err(
                        &format!("{label}: route {}: pool", i + 1),
                        format!("no pool named \"{p}\""),
                    );
                }
                _ => {}
            }
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
        Some("token") => HashKey::Token,
        Some(other) => {
            c.err(
                &format!("{place}hash_key"),
                format!("\"{other}\": expected src_ip, src_ip_port or token"),
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
    if proxy_protocol == ProxyProtocol::V1 && protocol == Protocol::Udp {
        c.err(
            &format!("{place}proxy_protocol"),
            "v1 has no UDP form: use \"v2\" on a udp listener",
        );
    }
    let (source, token) = super::game::validate_game(c, &place, protocol, hash_key, &l.source, &l.token);
    let (accept_proxy, sni) = super::preread::validate(c, &place, l, protocol);
    Some(ListenerConfig {
        relay,
        proxy_protocol,
        source,
        token,
        accept_proxy,
        sni,
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
    let (balance, hash_balance_factor, on_down, on_up) = validate_balance(c, &place, p);
    Some(PoolConfig {
        balance,
        hash_balance_factor,
        on_down,
        on_up,
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

/// `balance`, `hash_balance_factor`, `on_down`, `on_up` of a pool.
fn validate_balance(c: &mut Checker<'_>, place: &str, p: &PoolFile) -> (Balance, Option<u32>, OnDown, OnUp) {
    let balance = match p.balance.as_deref() {
        None | Some("maglev") => Balance::Maglev,
        Some("least_conn") => Balance::LeastConn,
        Some("random_two") => Balance::RandomTwo,
        Some(other) => {
            c.err(
                &format!("{place}balance"),
                format!("\"{other}\": expected \"maglev\", \"least_conn\" or \"random_two\""),
            );
            Balance::Maglev
        }
    };
    let factor = match p.hash_balance_factor {
        None => None,
        Some(x) if !(101..=10_000).contains(&x) => {
            c.err(
                &format!("{place}hash_balance_factor"),
                format!("{x} is out of range: a percent of the average load above 100 (101..=10000, e.g. 125)"),
            );
            None
        }
        Some(_) if balance != Balance::Maglev => {
            c.err(
                &format!("{place}hash_balance_factor"),
                format!(
                    "only applies to balance = \"maglev\" (this pool has balance = \"{}\")",
                    balance.name()
                ),
            );
            None
        }
        Some(x) => Some(x as u32),
    };
    let on_down = match p.on_down.as_deref() {
        None | Some("keep") => OnDown::Keep,
        Some("close") => OnDown::Close,
        Some(other) => {
            c.err(
                &format!("{place}on_down"),
                format!("\"{other}\": expected \"keep\" or \"close\""),
            );
            OnDown::Keep
        }
    };
    let on_up = match p.on_up.as_deref() {
        None | Some("keep") => OnUp::Keep,
        Some("close_backups") => OnUp::CloseBackups,
        Some(other) => {
            c.err(
                &format!("{place}on_up"),
                format!("\"{other}\": expected \"keep\" or \"close_backups\""),
            );
            OnUp::Keep
        }
    };
    (balance, factor, on_down, on_up)
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
        backup: b.backup.unwrap_or(false),
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
    use crate::token_bucket::BucketParams;
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
        Some("http") => CheckKind::Http(validate_http_check(c, place, h)),
        Some("postgres") => CheckKind::Postgres(PostgresCheck {
            user: required_name(c, place, "user", &h.user, "postgres"),
            database: optional_name(c, place, "database", &h.database),
        }),
        Some("mysql") => CheckKind::Mysql(MysqlCheck {
            user: optional_name(c, place, "user", &h.user),
        }),
        Some("redis") => {
            let role = match h.role.as_deref() {
                None => None,
                Some("master") => Some(RedisRole::Master),
                Some("replica") => Some(RedisRole::Replica),
                Some(other) => {
                    c.err(
                        &format!("{place}role"),
                        format!("\"{other}\": expected master or replica"),
                    );
                    None
                }
            };
            let noauth_is_up = h.noauth_is_up.unwrap_or(false);
            if noauth_is_up && role.is_some() {
                // ROLE needs an authenticated connection; ringlb holds no password.
                c.err(
                    &format!("{place}noauth_is_up"),
                    "cannot be combined with role: ROLE is refused with NOAUTH before AUTH, and the check sends no password",
                );
            }
            CheckKind::Redis(RedisCheck { role, noauth_is_up })
        }
        Some(other) => {
            c.err(
                &format!("{place}kind"),
                format!(
                    "\"{other}\": expected tcp, send_expect, udp_send_expect, http, postgres, mysql, redis or none"
                ),
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
    // Keys of one kind set on another are a mistake, not something to ignore:
    // say which kinds take them.
    let kind_name = h.kind.as_deref().unwrap_or("tcp");
    let belongs: [(&str, bool, &[&str]); 9] = [
        ("method", h.method.is_some(), &["http"]),
        ("path", h.path.is_some(), &["http"]),
        ("host", h.host.is_some(), &["http"]),
        ("expect_status", h.expect_status.is_some(), &["http"]),
        ("expect_body", h.expect_body.is_some(), &["http"]),
        ("user", h.user.is_some(), &["postgres", "mysql"]),
        ("database", h.database.is_some(), &["postgres"]),
        ("role", h.role.is_some(), &["redis"]),
        ("noauth_is_up", h.noauth_is_up.is_some(), &["redis"]),
    ];
    for (key, set, kinds) in belongs {
        if set && !kinds.contains(&kind_name) {
            let list: Vec<String> = kinds.iter().map(|k| format!("kind = \"{k}\"")).collect();
            c.err(
                &format!("{place}{key}"),
                format!(
                    "only applies to {} (this check is kind = \"{kind_name}\")",
                    list.join(" or ")
                ),
            );
        }
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

/// Longest `path`, `host`, `user`, `database`, `expect_body`: they go into
/// one request that must fit the check's write (and be readable in logs).
const MAX_CHECK_TEXT: usize = 1024;

fn validate_http_check(c: &mut Checker<'_>, place: &str, h: &file::HealthCheckFile) -> HttpCheck {
    let method = h.method.clone().unwrap_or_else(|| "GET".into());
    // A token (RFC 9110): no spaces or controls that would break the request line.
    if method.is_empty()
        || method.len() > 32
        || !method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        c.err(
            &format!("{place}method"),
            format!("{method:?}: expected an HTTP method such as GET, HEAD or OPTIONS"),
        );
    }
    let path = match &h.path {
        None => {
            c.err(
                &format!("{place}path"),
                "missing: kind = \"http\" needs the request path, e.g. path = \"/primary\"",
            );
            "/".to_string()
        }
        Some(p) if !p.starts_with('/') || p.len() > MAX_CHECK_TEXT || !p.bytes().all(|b| b.is_ascii_graphic()) => {
            c.err(&format!("{place}path"), format!("{p:?}: expected a path starting with / without spaces or control characters, at most {MAX_CHECK_TEXT} bytes"));
            "/".to_string()
        }
        Some(p) => p.clone(),
    };
    let host = match &h.host {
        Some(v) if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) => {
            c.err(
                &format!("{place}host"),
                format!("{v:?}: expected a host name (and optional :port) without spaces"),
            );
            None
        }
        v => v.clone(),
    };
    let expect_status = match &h.expect_status {
        None => StatusMatch::Class(2),
        Some(v) => parse_status_match(v).unwrap_or_else(|problem| {
            c.err(&format!("{place}expect_status"), problem);
            StatusMatch::Class(2)
        }),
    };
    let expect_body = match &h.expect_body {
        Some(b) if b.is_empty() || b.len() > MAX_CHECK_TEXT => {
            c.err(
                &format!("{place}expect_body"),
                format!("must be 1 to {MAX_CHECK_TEXT} bytes"),
            );
            None
        }
        b => b.clone().map(String::into_bytes),
    };
    if expect_body.is_some() && method.eq_ignore_ascii_case("HEAD") {
        c.err(
            &format!("{place}expect_body"),
            "a HEAD reply has no body: use GET, or drop expect_body",
        );
    }
    HttpCheck {
        method,
        path,
        host,
        expect_status,
        expect_body,
    }
}

/// `[200, 204]` or `"2xx"`.
fn parse_status_match(v: &toml::Value) -> Result<StatusMatch, String> {
    const HOW: &str = "expected a list of statuses such as [200, 204] or a class such as \"2xx\"";
    match v {
        toml::Value::String(s) => {
            let b = s.as_bytes();
            if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && b[1..].eq_ignore_ascii_case(b"xx") {
                Ok(StatusMatch::Class(b[0] - b'0'))
            } else if let Ok(code) = s.parse::<u16>() {
                if (100..=599).contains(&code) {
                    Ok(StatusMatch::Codes(vec![code]))
                } else {
                    Err(format!("{s:?}: a status is 100 to 599"))
                }
            } else {
                Err(format!("{s:?}: {HOW}"))
            }
        }
        toml::Value::Integer(_) => parse_status_match(&toml::Value::Array(vec![v.clone()])),
        toml::Value::Array(items) if !items.is_empty() && items.len() <= 32 => items
            .iter()
            .map(|i| match i.as_integer() {
                Some(code @ 100..=599) => Ok(code as u16),
                Some(code) => Err(format!("{code}: a status is 100 to 599")),
                None => Err(format!("{i}: {HOW}")),
            })
            .collect::<Result<Vec<u16>, String>>()
            .map(StatusMatch::Codes),
        other => Err(format!("{other}: {HOW} (1 to 32 statuses)")),
    }
}

fn required_name(c: &mut Checker<'_>, place: &str, key: &str, v: &Option<String>, kind: &str) -> String {
    match optional_name(c, place, key, v) {
        Some(v) => v,
        None => {
            if v.is_none() {
                c.err(
                    &format!("{place}{key}"),
                    format!("missing: kind = \"{kind}\" needs the {key} the check names"),
                );
            }
            String::new()
        }
    }
}

/// A name sent in a protocol message: no NUL (the protocols' terminator), bounded.
fn optional_name(c: &mut Checker<'_>, place: &str, key: &str, v: &Option<String>) -> Option<String> {
    match v {
        Some(s) if s.is_empty() || s.len() > MAX_CHECK_TEXT || s.contains('\0') => {
            c.err(
                &format!("{place}{key}"),
                format!("{s:?}: must be 1 to {MAX_CHECK_TEXT} bytes without NUL"),
            );
            None
        }
        v => v.clone(),
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

/// Loads `[geo]`: the prefixes file's text (read by the loader) and the
/// inline prefixes, interning their region names.
fn load_geo(
    c: &mut Checker<'_>,
    g: &file::GeoFile,
    prefixes: Option<PrefixesFile>,
) -> Vec<(crate::geo::Cidr, crate::geo::RegionId)> {
    let mut raw: Vec<(crate::geo::Cidr, String)> = Vec::new();
    if g.prefixes_file.is_some() {
        let Some(PrefixesFile { path, text }) = prefixes else {
            c.err("geo.prefixes_file", "the loader did not read it (a bug)");
            return Vec::new();
        };
        match text {
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
            backup: None,
        },
    );
    match b {
        Some(b) if c.errors.is_empty() => Ok(b),
        _ => Err(ConfigErrors(c.errors)),
    }
}
