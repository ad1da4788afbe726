//! What a model mutation asks of the shell: one `Effects` value per call.

use std::sync::Arc;

use crate::config::ListenerConfig;
use crate::stats::ListenerStats;

use super::health::CheckJob;

/// Everything a model mutation asks the shell (the control plane) to do.
/// The model itself never publishes, logs, signals a worker or starts a
/// check: it says so here, and the shell carries it out in this order:
/// logs, listeners stopped, listeners started, publish, close check, checks.
#[derive(Debug, Default)]
#[must_use = "the shell must carry out the model's effects"]
pub struct Effects {
    /// Publish a new snapshot (`Model::snapshot`).
    pub publish: bool,
    /// Wake connections so those that must close do (`WorkerCmd::CheckClose`).
    pub check_close: bool,
    /// Some pool was marked dirty: wake the ticker to rebuild it
    /// (`Model::rebuild_dirty`, at most once per tick).
    pub rebuild_soon: bool,
    /// New listeners registered by the model: hand them their sockets.
    pub start_listeners: Vec<StartListener>,
    /// Listener slots to stop accepting on (removed by a reload).
    pub stop_listeners: Vec<usize>,
    /// Active checks to run now (already marked in flight).
    pub checks: Vec<CheckJob>,
    /// Log lines, in order.
    pub logs: Vec<LogLine>,
}

/// A listener the model registered: the shell gives its bound sockets to
/// the workers under `slot`.
#[derive(Debug, Clone)]
pub struct StartListener {
    /// Slot id in the snapshot.
    pub slot: usize,
    /// Its settings.
    pub config: Arc<ListenerConfig>,
    /// Its counters (shared with the UDP listeners' specs).
    pub stats: Arc<ListenerStats>,
}

/// One log line the model wants written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Severity.
    pub level: log::Level,
    /// The text.
    pub text: String,
}

impl Effects {
    /// Folds `other` into `self` (flags or'ed, lists appended in order).
    pub fn merge(&mut self, other: Effects) {
        self.publish |= other.publish;
        self.check_close |= other.check_close;
        self.rebuild_soon |= other.rebuild_soon;
        self.start_listeners.extend(other.start_listeners);
        self.stop_listeners.extend(other.stop_listeners);
        self.checks.extend(other.checks);
        self.logs.extend(other.logs);
    }

    /// Adds a log line at `level`.
    pub fn log(&mut self, level: log::Level, text: String) {
        self.logs.push(LogLine { level, text });
    }

    /// Adds an info line.
    pub fn info(&mut self, text: String) {
        self.log(log::Level::Info, text);
    }

    /// Adds a warning.
    pub fn warn(&mut self, text: String) {
        self.log(log::Level::Warn, text);
    }

    /// Whether any line logged so far contains `needle` (for tests and
    /// callers that report what happened).
    pub fn logged(&self, needle: &str) -> bool {
        self.logs.iter().any(|l| l.text.contains(needle))
    }
}
