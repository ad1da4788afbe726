//! Backend state-change log lines: one line each when few, a summary per
//! kind when many, and at most [`STATE_LOG_LINES_PER_SEC`] a second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::effects::Effects;
use super::Model;

/// One backend state change waiting to be logged.
pub(super) struct StateChange {
    /// What happened, for the summary ("down", "up", "ejected", ...).
    pub kind: &'static str,
    pub addr: SocketAddr,
    /// Why (the summary quotes the first one's).
    pub reason: String,
    /// The line logged when it is one of few.
    pub line: String,
}

/// More state changes than this in one pool and tick are summarised.
const LOG_EACH_UP_TO: usize = 3;
/// Addresses named in a summary line.
const SUMMARY_NAMES: usize = 3;
/// State-change log lines (single or summary) per second, over all pools;
/// the rest are counted and reported in one line.
pub const STATE_LOG_LINES_PER_SEC: u32 = 20;

/// Caps state-change log lines per second.
#[derive(Debug)]
pub(super) struct LogCap {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl LogCap {
    /// A cap whose first window starts at `now`.
    pub fn new(now: Instant) -> LogCap {
        LogCap {
            window: now,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged at `now`.
    fn allow(&mut self, now: Instant, fx: &mut Effects) -> bool {
        self.roll(now, fx);
        if self.used < STATE_LOG_LINES_PER_SEC {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Starts a new window once a second has passed, reporting what the
    /// last ones suppressed.
    pub fn roll(&mut self, now: Instant, fx: &mut Effects) {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                fx.warn(format!(
                    "{} backend state-change log line(s) suppressed (more than {STATE_LOG_LINES_PER_SEC} a second); ctl backends shows every backend's state and reason",
                    self.suppressed
                ));
            }
            *self = LogCap::new(now);
        }
    }
}

impl Model {
    /// Logs pool `i`'s pending state changes: each as its own line when
    /// there are few, otherwise one summary line per kind ("pool "p": 37
    /// backend(s) down (a, b, c and 34 more; first: reason)"), all under the
    /// per-second cap.
    pub(super) fn flush_state_log(&mut self, i: usize, now: Instant, fx: &mut Effects) {
        let pending = std::mem::take(&mut self.pools[i].pending_log);
        if pending.is_empty() {
            return;
        }
        if pending.len() <= LOG_EACH_UP_TO {
            for c in pending {
                if self.log_cap.allow(now, fx) {
                    fx.info(c.line);
                }
            }
            return;
        }
        let mut kinds: Vec<&'static str> = Vec::new();
        for c in &pending {
            if !kinds.contains(&c.kind) {
                kinds.push(c.kind);
            }
        }
        let parts: Vec<String> = kinds
            .iter()
            .map(|kind| {
                let of_kind: Vec<&StateChange> = pending.iter().filter(|c| c.kind == *kind).collect();
                let names: Vec<String> = of_kind.iter().take(SUMMARY_NAMES).map(|c| c.addr.to_string()).collect();
                let more = of_kind.len().saturating_sub(SUMMARY_NAMES);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                let first = &of_kind[0].reason;
                format!(
                    "{} backend(s) {kind} ({}{more}; first: {first})",
                    of_kind.len(),
                    names.join(", ")
                )
            })
            .collect();
        if self.log_cap.allow(now, fx) {
            fx.info(format!("pool \"{}\": {}", self.pools[i].config.name, parts.join(", ")));
        }
    }
}
