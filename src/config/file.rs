//! The config file as written: raw serde structs that reject unknown keys.
//!
//! Nothing here is validated beyond TOML types; `validate` turns a
//! [`ConfigFile`] into a typed [`super::Config`].

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
    /// One log line per closed connection, at info.
    pub access_log: Option<bool>,
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
    /// `[[pool.backend]]`
    #[serde(default)]
    pub backend: Vec<BackendFile>,
}

/// `[[pool.backend]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// `ip:port`.
    pub addr: Option<String>,
    /// Relative share; default 1; 0 = configured but takes no new connections.
    pub weight: Option<i64>,
}
