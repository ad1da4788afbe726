//! Active checks as the model sees them: which are due (jobs for the
//! shell to run) and what a result does to a backend.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::CheckKind;
use crate::health::state::Transition;

use super::effects::Effects;
use super::log::StateChange;
use super::Model;

/// One active check to run.
#[derive(Debug, Clone)]
pub struct CheckJob {
    /// Pool index.
    pub pool: usize,
    /// Backend index when the check started (a hint: the epoch decides).
    pub index: usize,
    /// Pool name (for the concurrency limit).
    pub pool_name: String,
    /// Backend incarnation.
    pub epoch: u64,
    /// Address checked.
    pub target: SocketAddr,
    /// What to do.
    pub kind: CheckKind,
    /// Time allowed.
    pub timeout: Duration,
    /// The pool's concurrency limit.
    pub max_concurrent: usize,
}

/// An active check's result, as the shell reports it.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// Passed, failed, or none: ringlb could not run it (says nothing
    /// about the backend).
    pub passed: Option<bool>,
    /// How long it took.
    pub latency: Duration,
    /// What it saw, for `ctl backends` and the log.
    pub detail: String,
}

impl Model {
    /// Backends due for an active check at `now`: the effects carry the
    /// jobs, each marked in flight until its result comes back.
    pub fn due_checks(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        for (pi, p) in self.pools.iter_mut().enumerate() {
            let hc = &p.config.health_check;
            if hc.kind == CheckKind::None || p.retired {
                continue;
            }
            for (bi, b) in p.backends.iter_mut().enumerate() {
                if b.check_in_flight || now < b.next_check || b.remove_when_drained {
                    continue;
                }
                b.check_in_flight = true;
                let target = b.config.check_addr.unwrap_or_else(|| {
                    let mut a = b.config.addr;
                    if let Some(port) = hc.port {
                        a.set_port(port);
                    }
                    a
                });
                fx.checks.push(CheckJob {
                    pool: pi,
                    index: bi,
                    pool_name: p.config.name.clone(),
                    epoch: b.epoch,
                    target,
                    kind: hc.kind.clone(),
                    timeout: hc.timeout,
                    max_concurrent: hc.max_concurrent,
                });
            }
        }
        fx
    }

    /// Records the result of `job` at `now`. A change of state marks the
    /// pool dirty (rebuilt by [`Model::rebuild_dirty`], once for every
    /// change up to then) and sets [`Effects::rebuild_soon`]. A result for
    /// a backend that is gone (another epoch) is ignored.
    pub fn record_check(&mut self, job: &CheckJob, result: CheckResult, now: Instant) -> Effects {
        let mut fx = Effects::default();
        let Some(p) = self.pools.get_mut(job.pool) else {
            return fx;
        };
        // `index` is where the backend was when its check started: one
        // lookup, not a scan of the pool per result (removals shift it).
        let at = match p.backends.get(job.index) {
            Some(b) if b.epoch == job.epoch => Some(job.index),
            _ => p.backends.iter().position(|b| b.epoch == job.epoch),
        };
        let Some(be) = at.map(|i| &mut p.backends[i]) else {
            return fx;
        };
        let CheckResult {
            passed,
            latency,
            detail,
        } = result;
        be.check_in_flight = false;
        let interval = p.config.health_check.interval;
        be.next_check = now + interval + self.rng.jitter(p.config.health_check.jitter);
        let Some(ok) = passed else {
            // Says nothing about the backend: its state stays as it was.
            if !matches!(be.last_check, Some((None, ..))) {
                fx.warn(format!(
                    "pool \"{}\": check of {} {detail}; its state is kept until checks can run",
                    p.config.name, be.config.addr
                ));
            }
            be.last_check = Some((None, latency, detail));
            return fx;
        };
        let transition = be.active.record(ok);
        be.last_check = Some((Some(ok), latency, detail.clone()));
        let Some(t) = transition else { return fx };
        let name = &p.config.name;
        let change = match t {
            Transition::WentDown => {
                be.reason = format!("{} consecutive failed checks: {detail}", be.active.fall());
                StateChange {
                    kind: "down",
                    addr: be.config.addr,
                    reason: be.reason.clone(),
                    line: format!("pool \"{name}\": backend {} is down: {}", be.config.addr, be.reason),
                }
            }
            Transition::WentUp => {
                be.reason = format!("{} consecutive passed checks", be.active.rise());
                be.healthy_since = Some(now);
                StateChange {
                    kind: "up",
                    addr: be.config.addr,
                    reason: be.reason.clone(),
                    line: format!("pool \"{name}\": backend {} is up: {}", be.config.addr, be.reason),
                }
            }
        };
        p.pending_log.push(change);
        p.dirty = true;
        fx.rebuild_soon = true;
        fx
    }
}
