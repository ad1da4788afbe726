//! The control protocol: one JSON request per line, one JSON reply per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"backends","pool":"web"}` (paged
//! with `"limit"` and `"offset"`: backends per pool),
//! `{"cmd":"drain","pool":"web","addr":"10.0.0.1:80"}`, `enable`, `disable`,
//! `{"cmd":"weight","pool":..,"addr":..,"weight":5}`,
//! `{"cmd":"add","pool":..,"addr":..,"weight":2}`, `remove`, `{"cmd":"reload"}`,
//! `{"cmd":"stats"}`, `{"cmd":"route","listener":..,"client":..}`. `drain`,
//! `disable`, `weight`, `add` and `remove` take `"force": true` to leave a
//! pool with no usable backend. Replies: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`.

use serde::Deserialize;
use serde_json::{json, Value};

/// A parsed request.
#[derive(Debug, Deserialize)]
// Unit variants would silently accept extra fields (serde ignores
// deny_unknown_fields there), so every variant is a struct variant.
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Version, uptime, engines, config, listeners.
    Status {},
    /// Per-backend state and counters.
    Backends {
        /// Only this pool.
        #[serde(default)]
        pool: Option<String>,
        /// At most this many backends per pool (paging; all by default).
        #[serde(default)]
        limit: Option<usize>,
        /// Skip this many backends of each pool first.
        #[serde(default)]
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
        #[serde(default)]
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
    },
}

/// Parses one request line; the error is what the client is told.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty request".into());
    }
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// An ok reply carrying `fields`.
pub fn ok(mut fields: Value) -> Value {
    match fields.as_object_mut() {
        Some(map) => {
            map.insert("ok".into(), Value::Bool(true));
            fields
        }
        None => json!({"ok": true, "result": fields}),
    }
}

/// An error reply.
pub fn error(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
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
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?} accepted");
        }
    }
}
