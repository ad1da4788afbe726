//! `[control] state_file`: operator states (drains, disables) kept across restarts and upgrades.
//!
//! What is kept follows the reload rules, so that a restart behaves like a
//! reload: the file wins for membership and weights (backends added with
//! `ctl add` and weights set with `ctl weight` are not kept), and the
//! operator states of backends the file still lists are (they describe a
//! machine, not the config). The file is JSON, written whole on every
//! change (write a temporary file, fsync, rename, fsync the directory), so
//! a reader sees the old state or the new one, never half of one. At start
//! a missing file is normal; a corrupt or foreign one, or one whose states
//! would leave a pool with nothing in service, is logged and ignored as a
//! whole: never fatal, never applied in part.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::health::state::AdminState;
use crate::model::{Effects, Model};

/// The `format` every state file carries: anything else is foreign.
pub const FORMAT: &str = "ringlb-state";
/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest state file read (10,000 drained backends take about 1 MiB).
pub const MAX_BYTES: u64 = 16 << 20;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDoc {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Backends not in service by the operator's choice, in pool order.
    pub backends: Vec<Entry>,
}

/// One backend's operator state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Pool name.
    pub pool: String,
    /// Backend address.
    pub addr: SocketAddr,
    /// `draining` or `disabled`.
    pub state: Saved,
}

/// An operator state worth keeping (enabled is the default and not written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Saved {
    /// `ctl drain`.
    Draining,
    /// `ctl disable`.
    Disabled,
}

impl Saved {
    fn admin(self) -> AdminState {
        match self {
            Saved::Draining => AdminState::Draining,
            Saved::Disabled => AdminState::Disabled,
        }
    }
}

/// The operator states of `model` as they would be written.
pub fn collect(model: &Model) -> StateDoc {
    let backends = model
        .pools
        .iter()
        .filter(|p| !p.retired)
        .flat_map(|p| {
            p.backends
                .iter()
                // A backend on its way out of the pool is no longer the operator's to keep.
                .filter(|b| !b.remove_when_drained)
                .filter_map(|b| {
                    let state = match b.admin {
                        AdminState::Enabled => return None,
                        AdminState::Draining => Saved::Draining,
                        AdminState::Disabled => Saved::Disabled,
                    };
                    Some(Entry {
                        pool: p.config.name.clone(),
                        addr: b.config.addr,
                        state,
                    })
                })
        })
        .collect();
    StateDoc {
        format: FORMAT.into(),
        version: VERSION,
        backends,
    }
}

/// Writes `doc` to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory (so the
/// rename itself survives a crash).
pub fn write(path: &Path, doc: &StateDoc) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let text = serde_json::to_vec_pretty(doc).map_err(std::io::Error::other)?;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a state file: `Ok(None)` when there is none, an error saying what
/// is wrong with a corrupt, foreign or oversized one.
pub fn read(path: &Path) -> Result<Option<StateDoc>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut text = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_BYTES {
        return Err(format!("larger than the {} MiB limit", MAX_BYTES >> 20));
    }
    parse(&text).map(Some)
}

/// Parses the text of a state file (see [`read`]).
pub fn parse(text: &[u8]) -> Result<StateDoc, String> {
    // The marker is checked first, so a foreign JSON file is called foreign,
    // not "unknown field".
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(format!("not a ringlb state file (no \"format\": \"{FORMAT}\")"));
    }
    if value.get("version").and_then(|v| v.as_u64()) != Some(u64::from(VERSION)) {
        return Err(format!(
            "state file version {} is not the version {VERSION} this ringlb reads",
            value.get("version").map_or("(none)".to_string(), |v| v.to_string())
        ));
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// What restoring a state file into a model would do: the backends to set
/// (pool index, backend index, state) and the entries naming backends the
/// config no longer has (skipped, as a reload would drop them).
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// (pool, backend, state) to set.
    pub set: Vec<(usize, usize, Saved)>,
    /// Entries whose pool or backend is not in the config.
    pub unknown: Vec<String>,
}

/// Plans a restore, or says why none may happen: a file whose states would
/// leave a pool with no backend in service breaks the pool rules that
/// `ctl` and reload apply, and is ignored whole.
pub fn plan(model: &Model, doc: &StateDoc) -> Result<Plan, String> {
    let mut set = Vec::new();
    let mut unknown = Vec::new();
    for e in &doc.backends {
        let found = model.pool_index(&e.pool).and_then(|p| {
            model.pools[p]
                .backends
                .iter()
                .position(|b| b.config.addr == e.addr && !b.remove_when_drained)
                .map(|b| (p, b))
        });
        match found {
            Some((p, b)) => set.push((p, b, e.state)),
            None => unknown.push(format!("pool \"{}\" backend {}", e.pool, e.addr)),
        }
    }
    let mut problems = Vec::new();
    for (p, pool) in model.pools.iter().enumerate().filter(|(_, p)| !p.retired) {
        if !set.iter().any(|&(sp, _, _)| sp == p) {
            continue;
        }
        let members: Vec<crate::config::PoolMember> = pool
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.remove_when_drained)
            .map(|(i, b)| crate::config::PoolMember {
                weight: b.config.weight,
                in_service: b.admin == AdminState::Enabled && !set.iter().any(|&(sp, sb, _)| sp == p && sb == i),
            })
            .collect();
        for (key, problem) in crate::config::pool_rule_problems(&members, pool.config.table_size) {
            problems.push(format!("pool \"{}\": {key}: {problem}", pool.config.name));
        }
    }
    if problems.is_empty() {
        Ok(Plan { set, unknown })
    } else {
        Err(problems.join("; "))
    }
}

/// Restores the state file of `model`'s config into it at start (before
/// anything is served). Returns what is on disk when it was applied in
/// full, so the next change is written only if it differs, and the
/// effects of the rebuilt pools (for `Server::apply`); every other
/// outcome is logged and leaves the model as the config file made it.
pub fn restore(model: &mut Model, now: Instant) -> (Option<StateDoc>, Effects) {
    let mut fx = Effects::default();
    let Some(path) = model.config.control.state_file.clone() else {
        return (None, fx);
    };
    let shown = path.display();
    let doc = match read(&path) {
        Ok(None) => {
            log::info!("state file {shown}: none yet; starting with the config file's states");
            return (None, fx);
        }
        Ok(Some(doc)) => doc,
        Err(e) => {
            log::warn!("state file {shown}: {e}; ignored (every backend starts as the config file says)");
            return (None, fx);
        }
    };
    let plan = match plan(model, &doc) {
        Ok(plan) => plan,
        Err(e) => {
            log::warn!(
                "state file {shown}: its states would break the pool rules ({e}); ignored (every backend starts as the config file says)"
            );
            return (None, fx);
        }
    };
    let mut pools = Vec::new();
    for &(p, b, state) in &plan.set {
        let timeout = model.pools[p].config.drain_timeout;
        let be = &mut model.pools[p].backends[b];
        be.admin = state.admin();
        be.drain_deadline = Some(now + timeout);
        be.shared.closing.store(false, Ordering::SeqCst);
        be.reason = format!(
            "{} by operator (restored from the state file)",
            if state == Saved::Disabled {
                "disabled"
            } else {
                "drained"
            }
        );
        if !pools.contains(&p) {
            pools.push(p);
        }
    }
    for p in pools {
        fx.merge(model.rebuild(p, now));
    }
    let list: Vec<String> = plan
        .set
        .iter()
        .map(|&(p, b, s)| {
            format!(
                "pool \"{}\" backend {} {}",
                model.pools[p].config.name,
                model.pools[p].backends[b].config.addr,
                if s == Saved::Disabled { "disabled" } else { "draining" }
            )
        })
        .collect();
    log::info!(
        "state file {shown}: restored {} operator state(s){}{}",
        list.len(),
        if list.is_empty() {
            String::new()
        } else {
            format!(": {}", list.join(", "))
        },
        if plan.unknown.is_empty() {
            String::new()
        } else {
            format!(
                "; {} for backends the config no longer has, dropped as a reload drops them: {}",
                plan.unknown.len(),
                plan.unknown.join(", ")
            )
        }
    );
    (plan.unknown.is_empty().then_some(doc), fx)
}

/// Whether ringlb could keep its state file at `path` (for `check` and
/// `run`): not a directory or some other non-file, its directory there.
pub fn usable(path: &Path) -> Result<(), String> {
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
    }
    let dir: PathBuf = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or(PathBuf::from("."), Path::to_path_buf);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{}: {} is not a directory", path.display(), dir.display())),
        Err(e) => Err(format!("{}: directory {}: {e}", path.display(), dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(entries: &[(&str, &str, Saved)]) -> StateDoc {
        StateDoc {
            format: FORMAT.into(),
            version: VERSION,
            backends: entries
                .iter()
                .map(|(p, a, s)| Entry {
                    pool: p.to_string(),
                    addr: a.parse().unwrap(),
                    state: *s,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips_through_the_atomic_write() {
        let dir = std::env::temp_dir().join(format!("ringlb-state-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let d = doc(&[
            ("web", "10.0.0.1:80", Saved::Draining),
            ("db", "[::1]:5432", Saved::Disabled),
        ]);
        write(&path, &d).unwrap();
        assert_eq!(read(&path).unwrap(), Some(d));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_is_none_and_corrupt_or_foreign_is_an_error() {
        assert_eq!(read(Path::new("/nonexistent/ringlb/state.json")), Ok(None));
        assert!(parse(b"{\"format\":\"ringlb-state\",\"version\":1,\"backends\":[")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse(b"{\"servers\":[]}")
            .unwrap_err()
            .contains("not a ringlb state file"));
        assert!(parse(b"{\"format\":\"ringlb-state\",\"version\":7,\"backends\":[]}")
            .unwrap_err()
            .contains("version 7"));
        let bad_state =
            br#"{"format":"ringlb-state","version":1,"backends":[{"pool":"p","addr":"127.0.0.1:1","state":"up"}]}"#;
        assert!(parse(bad_state).is_err());
        let bad_addr =
            br#"{"format":"ringlb-state","version":1,"backends":[{"pool":"p","addr":"nowhere","state":"disabled"}]}"#;
        assert!(parse(bad_addr).is_err());
    }
}
