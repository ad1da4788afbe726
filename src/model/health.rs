//! Active checks as the model sees them: which are due (jobs for the
//! shell to run) and what a result does to a backend.

use std::cmp::Reverse;
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

/// A backend's next check, as queued: pool and backend index and epoch at
/// queueing time (hints, checked when popped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct DueCheck {
    at: Instant,
    pool: usize,
    index: usize,
    epoch: u64,
}

/// How often [`Model::due_checks`] reads every backend instead of the queue.
pub(super) const FULL_CHECK_SCAN_EVERY: Duration = Duration::from_millis(250);

/// The check of backend `bi` of pool `pi` if it is due at `now` (marked in
/// flight), or None when it is not due, already running, leaving, or its
/// pool is not checked.
fn start_check(pi: usize, p: &mut super::state::PoolState, bi: usize, now: Instant) -> Option<CheckJob> {
    let hc = &p.config.health_check;
    let b = &mut p.backends[bi];
    if hc.kind == CheckKind::None || p.retired || b.check_in_flight || now < b.next_check || b.remove_when_drained {
        return None;
    }
    b.check_in_flight = true;
    let target = b.config.check_addr.unwrap_or_else(|| {
        let mut a = b.config.addr;
        if let Some(port) = hc.port {
            a.set_port(port);
        }
        a
    });
    Some(CheckJob {
        pool: pi,
        index: bi,
        pool_name: p.config.name.clone(),
        epoch: b.epoch,
        target,
        kind: hc.kind.clone(),
        timeout: hc.timeout,
        max_concurrent: hc.max_concurrent,
    })
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
    ///
    /// Pops the due entries of the check queue; every
    /// [`FULL_CHECK_SCAN_EVERY`] it reads every backend as well, which picks
    /// up backends the queue has no entry for (added, or in a pool that
    /// moved in a reload) and re-queues the rest, so a lost entry costs at
    /// most that long.
    pub fn due_checks(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        while let Some(&Reverse(due)) = self.check_queue.peek() {
            if due.at > now {
                break;
            }
            self.check_queue.pop();
            let Some(p) = self.pools.get_mut(due.pool) else {
                continue;
            };
            // Most entries are where they were queued; a removal shifts the
            // rest of the pool, so fall back to finding the epoch.
            let at = match p.backends.get(due.index) {
                Some(b) if b.epoch == due.epoch => Some(due.index),
                _ => p.backends.iter().position(|b| b.epoch == due.epoch),
            };
            if let Some(job) = at.and_then(|bi| start_check(due.pool, p, bi, now)) {
                fx.checks.push(job);
            }
        }
        if now >= self.full_scan_at {
            self.full_scan_at = now + FULL_CHECK_SCAN_EVERY;
            self.check_queue.clear();
            for (pi, p) in self.pools.iter_mut().enumerate() {
                for bi in 0..p.backends.len() {
                    if let Some(job) = start_check(pi, p, bi, now) {
                        fx.checks.push(job);
                    } else if !p.backends[bi].check_in_flight {
                        let b = &p.backends[bi];
                        self.check_queue.push(Reverse(DueCheck {
                            at: b.next_check,
                            pool: pi,
                            index: bi,
                            epoch: b.epoch,
                        }));
                    }
                }
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
        let Some(index) = at else {
            return fx;
        };
        let be = &mut p.backends[index];
        let CheckResult {
            passed,
            latency,
            detail,
        } = result;
        be.check_in_flight = false;
        let interval = p.config.health_check.interval;
        be.next_check = now + interval + self.rng.jitter(p.config.health_check.jitter);
        self.check_queue.push(Reverse(DueCheck {
            at: be.next_check,
            pool: job.pool,
            index,
            epoch: job.epoch,
        }));
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
        let Some(t) = transition else {
            // Still down and still failing, perhaps for another reason now (a
            // PostgreSQL that was refusing, then starting up): the reason follows.
            let prefix = format!("{} consecutive failed checks: ", be.active.fall());
            if !ok && be.reason.starts_with(&prefix) && be.reason[prefix.len()..] != detail {
                be.reason = format!("{prefix}{detail}");
            }
            // Up and passing: a protocol check's answer ("redis role is master")
            // replaces "configured" and follows the server (tcp checks say "ok").
            let passed = format!("{} consecutive passed checks", be.active.rise());
            if ok && detail != "ok" && be.active.is_up() {
                let updated = if be.reason.starts_with(&passed) {
                    Some(format!("{passed}: {detail}"))
                } else if be.reason == "configured" || be.reason.starts_with("check passed: ") {
                    Some(format!("check passed: {detail}"))
                } else {
                    None
                };
                if let Some(r) = updated.filter(|r| *r != be.reason) {
                    be.reason = r;
                }
            }
            return fx;
        };
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
                // A protocol check says what it saw ("redis role is master").
                be.reason = if detail == "ok" {
                    format!("{} consecutive passed checks", be.active.rise())
                } else {
                    format!("{} consecutive passed checks: {detail}", be.active.rise())
                };
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
